"""ActionProcess: one draw of robot actions for a batch of observations, as a one-stage Process.

A candidate is one policy sample for one observation. ``init`` draws each
candidate's sampling noise from its own stream, ``step`` runs the policy on
the candidates' observation rows and that noise (one policy row per
candidate), and ``finish`` returns the actions. A candidate's action is
therefore a function of its observation and its stream alone: it does not
depend on how candidates are batched or ordered.

The process is also the gate for what a policy returns: the shape must match
the action space, and a sample with a NaN or inf is marked invalid and
zeroed rather than passed on, where a single NaN would poison a fitted
Gaussian.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch

from ...core.errors import MmttsError, call_user
from ...core.process import Process
from ...core.rng import Streams
from ...core.state import State
from .policy import (SamplingPolicy, all_finite, as_observations, check_shapes, expand_rows, parameter_dtype,
                     take_rows)
from .space import ActionSpace


class NoValidActionError(MmttsError):
    """Every sample the policy drew for some observation was NaN or infinite."""


class ActionProcess(Process):
    """Policy samples for a batch of B observations: candidate ``i`` of a run answers observation ``i % B``.

    Starting ``B * N`` fresh candidates therefore gives N samples of every
    observation, in rounds: candidates ``r * B .. r * B + B - 1`` are round r.
    One candidate costs one policy forward (``nfe_per_stage = 1``). The
    verifier's context of a candidate is its observation row.

    Args:
        policy: a :class:`~mmtts.modalities.vla.policy.SamplingPolicy` (``GaussianPolicy``, ``NoisePolicy``,
            ``TokenActionPolicy``, or anything with ``draw_noise`` and ``actions_from_noise``).
        observations: a LeRobot-shaped batch of B >= 1 observations (``"observation.state"`` (B, S), ...);
            numpy arrays become tensors and floating entries take the policy's dtype.
        space: the action space the samples must fit.
    """

    num_stages = 1
    nfe_per_stage = 1
    latent_key = "noise"

    def __init__(self, policy: SamplingPolicy, observations: Mapping[str, Any], space: ActionSpace):
        if not (hasattr(policy, "draw_noise") and hasattr(policy, "actions_from_noise")):
            raise MmttsError(f"{type(policy).__name__} cannot sample: wrap it in GaussianPolicy, NoisePolicy or "
                             "TokenActionPolicy, or give it draw_noise(streams, space) and "
                             "actions_from_noise(batch, noise)")
        if not isinstance(space, ActionSpace):
            raise MmttsError(f"space must be an ActionSpace (e.g. ActionSpace.from_gym(env.action_space)), "
                             f"not {type(space).__name__}")
        self.policy, self.space, self.dtype = policy, space, parameter_dtype(policy)
        self._observe(observations)

    def _observe(self, observations: Mapping[str, Any]) -> None:
        observations = as_observations(observations, self.dtype)
        self.rows = check_shapes(observations, getattr(self.policy, "input_shapes", None) or {})
        self.observations = observations

    def with_observations(self, observations: Mapping[str, Any]) -> "ActionProcess":
        """The same process (policy, space, the policy's dtype as read when this one was built) for another
        batch of observations, converted and checked as the constructor does: what a control loop builds at
        every step, without repeating the policy's checks."""
        new = copy.copy(self)
        new._observe(observations)
        return new

    def nfe_per_candidate(self) -> int:
        """One policy forward per candidate."""
        return self.nfe_per_stage

    # -- the process ---------------------------------------------------------------
    def init(self, streams: Streams, first_index: int = 0) -> State:
        n = len(streams)
        row = torch.arange(first_index, first_index + n, dtype=torch.int64)
        if self.rows > 1:
            row = row.remainder_(self.rows)
        else:
            row.zero_()
        noise = _policy_call("draw_noise", self.policy.draw_noise, streams, self.space)
        return State.fresh({"row": row, "noise": noise}, streams, first_index)

    def step(self, state: State) -> State:
        noise = state.data["noise"]
        out = _policy_call("actions_from_noise", self.policy.actions_from_noise,
                           self.observations_at(state.data["row"]), noise)
        n, d = len(state), self.space.dim
        if not isinstance(out, torch.Tensor) or out.is_complex():
            got = f"a {out.dtype} tensor" if isinstance(out, torch.Tensor) else type(out).__name__
            raise MmttsError(f"actions_from_noise returned {got}; it must return a tensor of real actions")
        if not out.is_floating_point():  # integer (binned) or bool actions are numbers: read them as floats
            out = out.to(torch.get_default_dtype())
        if out.ndim == 2:
            out = out[:, None]
        if out.ndim != 3 or out.shape[0] != n or out.shape[-1] != d:
            raise MmttsError(f"the policy returned actions of shape {tuple(out.shape)} for {n} samples; expected "
                             f"({n}, {d}) or ({n}, horizon, {d}): one action (chunk) per sample, with the "
                             f"space's {d} action dimensions")
        out = out.detach()
        if not out.is_floating_point() or all_finite(out):  # one reduction in the common case
            valid = torch.ones(n, dtype=torch.bool)
        else:
            valid = torch.isfinite(out).flatten(1).all(1)
            out = torch.where(valid[:, None, None].to(out.device), out, torch.zeros_like(out))
        new = state.replace(action=out, valid=valid.cpu())
        new.stage = state.stage + 1
        return new

    def finish(self, state: State) -> torch.Tensor:
        """The candidates' actions (M, H, D); invalid samples are zero (see :meth:`valid`)."""
        return state.data["action"]

    def context(self, state: State) -> dict:
        """Each candidate's observation row, for the verifier."""
        return self.observations_at(state.data["row"])

    # -- what the action strategies read ----------------------------------------------
    def valid(self, state: State) -> torch.Tensor:
        """(M,) bool: which finished candidates are finite samples."""
        return state.data["valid"]

    def observations_at(self, row: torch.Tensor) -> dict:
        """The observations at ``row`` (M,), one per candidate (views of a single observation)."""
        if self.rows == 1:
            return expand_rows(self.observations, row.shape[0])
        return take_rows(self.observations, row)

    def describe(self) -> dict:
        return {**super().describe(), "observations": self.rows, "action_dim": self.space.dim}


def _policy_call(what: str, fn, *args):
    """``fn(*args)``, with an exception the policy raises turned into an MmttsError that names the call."""
    return call_user(fn, *args, explain=lambda e: f"the policy's {what} raised {type(e).__name__}: {e}; check the "
                     "policy against the observations (keys, shapes, dtypes) and the action space")
