"""Action verifiers: score (observation, instruction, action) triples, higher is better.

``ActionVerifier`` is a core :class:`~mmtts.core.Verifier`, so it gets the
core's checks (one finite score per candidate, NaN ranked last) and combines
with ``MeanRank`` and ``Cached`` like any other verifier. The candidates are
its outputs and the observations are its context, one row per candidate,
scored in one batched forward.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import MmttsError
from ...core.verifier import Verifier, check_scores
from .policy import STATE_KEY, all_finite, batch_rows


class ActionVerifier(Verifier):
    """Wrap a scoring module ``scorer(observations, actions) -> (M,)`` as a core verifier.

    ``observations`` is a LeRobot-shaped batch with one row per candidate
    (instruction under ``"task"`` when the scorer reads one) and ``actions``
    is (M, H, D). A ``Mapping`` context is required: a verifier of actions
    cannot judge an action without the observation it answers.
    """

    def __init__(self, scorer: nn.Module, name: str = "action-verifier", nonfinite: str = "last"):
        super().__init__(nonfinite)
        self.scorer, self.name = scorer, name

    def __call__(self, outputs: Any, context: Any = None) -> torch.Tensor:
        """The core verifier's call (count, score, check), with a one-operation check instead of a numpy
        round trip when the scorer returns what it should: one finite score per candidate."""
        if not isinstance(outputs, torch.Tensor) or outputs.ndim == 0 or outputs.shape[0] == 0:
            return super().__call__(outputs, context)
        n = outputs.shape[0]
        raw = self.score(outputs, context)
        self._evaluations += n
        if isinstance(raw, torch.Tensor) and raw.shape == (n,) and raw.is_floating_point() and all_finite(raw):
            return raw.detach().to(device="cpu", dtype=torch.float64)
        return check_scores(raw, n, self.name, self.nonfinite)

    @torch.no_grad()
    def score(self, outputs: torch.Tensor, context: Any = None) -> torch.Tensor:
        if not isinstance(context, Mapping):
            raise MmttsError("an action verifier needs the observations as context: a dict batch with one row per "
                             "candidate action")
        if batch_rows(context) != outputs.shape[0]:
            raise MmttsError(f"{outputs.shape[0]} actions but {batch_rows(context)} observations; pass one "
                             "observation row per candidate")
        acts = outputs if outputs.ndim == 3 else outputs.unsqueeze(1)
        return self.scorer(context, acts).reshape(-1)


class MLPActionScorer(nn.Module):
    """A small state-action scorer: an MLP on the standardised state and the flattened action (chunk).

    The standardisation statistics are buffers, so they travel with the
    weights in a safetensors state dict. When scoring without gradients the
    standardisation is folded into the first layer (recomputed whenever the
    weights or the statistics change), which saves two operations per call.
    """

    def __init__(self, state_dim: int, action_dim: int, horizon: int = 1, hidden: int = 128,
                 state_key: str = STATE_KEY):
        super().__init__()
        self.state_key, self.horizon, self.action_dim = state_key, horizon, action_dim
        self.net = nn.Sequential(nn.Linear(state_dim + horizon * action_dim, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.register_buffer("state_mean", torch.zeros(state_dim))
        self.register_buffer("state_std", torch.ones(state_dim))
        self._folded: tuple | None = None

    def set_normalisation(self, states: torch.Tensor) -> None:
        self.state_mean.copy_(states.mean(0))
        self.state_std.copy_(states.std(0).clamp(min=1e-6))

    def _first_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first layer's weight and bias with the state standardisation folded in."""
        lin, mean, std = self.net[0], self.state_mean, self.state_std
        key = (lin.weight._version, lin.bias._version, mean._version, std._version, lin.weight.data_ptr(),
               mean.data_ptr(), std.data_ptr())
        if self._folded is None or self._folded[0] != key:
            n = mean.shape[0]
            w = lin.weight.detach().clone()
            w[:, :n] = w[:, :n] / std
            b = lin.bias.detach() - w[:, :n] @ mean
            self._folded = (key, w, b)
        return self._folded[1], self._folded[2]

    def forward(self, observations: Mapping[str, Any], actions: torch.Tensor) -> torch.Tensor:
        s = observations[self.state_key]
        if s.dtype != self.state_mean.dtype:
            s = s.to(self.state_mean.dtype)
        a = actions.reshape(actions.shape[0], -1)
        if a.shape[1] != self.horizon * self.action_dim:
            raise MmttsError(f"this scorer takes actions of {self.horizon} x {self.action_dim}; got "
                             f"{tuple(actions.shape[1:])}")
        if a.dtype != s.dtype:
            a = a.to(s.dtype)
        hidden, out = self.net[2], self.net[4]
        if torch.is_grad_enabled():
            first = self.net[0](torch.cat([(s - self.state_mean) / self.state_std, a], 1))
        else:
            first = F.linear(torch.cat([s, a], 1), *self._first_layer())
        h = F.linear(F.silu(first), hidden.weight, hidden.bias)
        return F.linear(F.silu(h), out.weight, out.bias).view(-1)
