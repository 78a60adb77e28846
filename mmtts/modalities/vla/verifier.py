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
            return raw.detach().double() if raw.is_cpu else raw.detach().to("cpu", torch.float64)
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


class QuadraticFeatures(nn.Module):
    """A fixed quadratic map of the state, ``f(x) = L x + Q (x outer x)``: (M, S) -> (M, F).

    Selections, sums and differences are its linear part; products, such as a
    vector turned into the frame of an observed angle (``cos a * x + sin a * y``),
    its quadratic part. Because the map is fixed, a scorer folds it into its
    first layer when scoring. ``linear`` is (F, S), ``quadratic`` (F, S, S).
    """

    def __init__(self, linear: torch.Tensor, quadratic: torch.Tensor | None = None):
        super().__init__()
        linear = torch.as_tensor(linear, dtype=torch.float32)
        f, s = linear.shape
        quadratic = torch.zeros(f, s, s) if quadratic is None else torch.as_tensor(quadratic, dtype=torch.float32)
        if quadratic.shape != (f, s, s):
            raise MmttsError(f"a quadratic feature map with linear part {(f, s)} needs a quadratic part of shape "
                             f"{(f, s, s)}, got {tuple(quadratic.shape)}")
        self.register_buffer("linear", linear)
        self.register_buffer("quadratic", quadratic)

    @property
    def in_dim(self) -> int:
        return self.linear.shape[1]

    @property
    def out_dim(self) -> int:
        return self.linear.shape[0]

    @staticmethod
    def outer(x: torch.Tensor) -> torch.Tensor:
        """All pairwise products of the state's entries, (M, S * S)."""
        return (x.unsqueeze(2) * x.unsqueeze(1)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.linear.T + self.outer(x) @ self.quadratic.flatten(1).T


class MLPActionScorer(nn.Module):
    """A small state-action scorer: an MLP on the standardised state (features) and the flattened action (chunk).

    ``features`` (a :class:`QuadraticFeatures`) replaces the raw state by a
    fixed map of it, for instance one invariant to a symmetry of the task.
    The standardisation statistics are buffers, so they travel with the
    weights in a safetensors state dict. When scoring without gradients the
    feature map and the standardisation are folded into the first layer
    (recomputed whenever the weights or the statistics change), which saves
    their operations on every call.
    """

    def __init__(self, state_dim: int, action_dim: int, horizon: int = 1, hidden: int = 128,
                 state_key: str = STATE_KEY, features: QuadraticFeatures | None = None):
        super().__init__()
        if features is not None and features.in_dim != state_dim:
            raise MmttsError(f"the feature map reads states of {features.in_dim} entries; the scorer's are {state_dim}")
        self.state_key, self.horizon, self.action_dim = state_key, horizon, action_dim
        self.features = features
        width = state_dim if features is None else features.out_dim
        self.net = nn.Sequential(nn.Linear(width + horizon * action_dim, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.register_buffer("state_mean", torch.zeros(width))
        self.register_buffer("state_std", torch.ones(width))
        self._folded: tuple | None = None

    def set_normalisation(self, states: torch.Tensor) -> None:
        """Standardise by the mean and standard deviation of (the features of) ``states`` (M, S)."""
        if self.features is not None:
            states = self.features(states.to(self.state_mean.dtype))
        self.state_mean.copy_(states.mean(0))
        self.state_std.copy_(states.std(0).clamp(min=1e-6))

    def _sources(self) -> list[torch.Tensor]:
        """The tensors the scoring parameters are computed from (looked up in the modules' own dicts: cheap)."""
        m, buffers = self.net._modules, self._buffers
        p1, p2, p3 = m["0"]._parameters, m["2"]._parameters, m["4"]._parameters
        return [p1["weight"], p1["bias"], p2["weight"], p2["bias"], p3["weight"], p3["bias"], buffers["state_mean"],
                buffers["state_std"]]

    def _eval_params(self) -> tuple[torch.Tensor, ...]:
        """(w1, b1, w2, b2, w3, b3) for scoring, the standardisation (and the feature map) folded into w1, b1.

        The first layer's input is then the raw state (and, with features, the
        state's pairwise products) followed by the action. The folded copy is
        kept while every source tensor is the same object at the same version
        (so an optimiser step, ``load_state_dict`` or ``.to()`` refreshes it).
        """
        srcs = self._sources()
        key = [id(t) for t in srcs] + [t._version for t in srcs]  # the cache holds the sources: ids stay unique
        cache = self._folded
        if cache is not None and cache[0] == key:
            return cache[2]
        w1, b1, w2, b2, w3, b3, mean, std = (t.detach() for t in srcs)
        n = mean.shape[0]
        w_state = w1[:, :n] / std
        if self.features is not None:
            f = self.features
            w_state = torch.cat([w_state @ f.linear, w_state @ f.quadratic.flatten(1)], 1)
        params = (torch.cat([w_state, w1[:, n:]], 1), b1 - (w1[:, :n] / std) @ mean, w2, b2, w3, b3)
        self._folded = (key, srcs, params)
        return params

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
        if torch.is_grad_enabled():  # training: the explicit standardisation, so gradients reach every layer
            x = s if self.features is None else self.features(s)
            return self.net(torch.cat([(x - self.state_mean) / self.state_std, a], 1)).view(-1)
        w1, b1, w2, b2, w3, b3 = self._eval_params()
        x = torch.cat([s, a] if self.features is None else [s, QuadraticFeatures.outer(s), a], 1)
        return F.linear(F.silu(F.linear(F.silu(F.linear(x, w1, b1)), w2, b2)), w3, b3).view(-1)
