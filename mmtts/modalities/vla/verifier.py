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
from torch import nn

from ...core.errors import MmttsError
from ...core.verifier import Verifier
from .policy import STATE_KEY, batch_rows


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

    @torch.no_grad()
    def score(self, outputs: torch.Tensor, context: Any = None) -> torch.Tensor:
        if not isinstance(context, Mapping):
            raise MmttsError("an action verifier needs the observations as context: a dict batch with one row per "
                             "candidate action")
        if batch_rows(context) != outputs.shape[0]:
            raise MmttsError(f"{outputs.shape[0]} actions but {batch_rows(context)} observations; pass one "
                             "observation row per candidate")
        acts = outputs if outputs.ndim == 3 else outputs[:, None]
        return self.scorer(context, acts).reshape(-1)


class MLPActionScorer(nn.Module):
    """A small state-action scorer: an MLP on the standardised state and the flattened action (chunk).

    The standardisation statistics are buffers, so they travel with the
    weights in a safetensors state dict.
    """

    def __init__(self, state_dim: int, action_dim: int, horizon: int = 1, hidden: int = 128,
                 state_key: str = STATE_KEY):
        super().__init__()
        self.state_key, self.horizon, self.action_dim = state_key, horizon, action_dim
        self.net = nn.Sequential(nn.Linear(state_dim + horizon * action_dim, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.register_buffer("state_mean", torch.zeros(state_dim))
        self.register_buffer("state_std", torch.ones(state_dim))

    def set_normalisation(self, states: torch.Tensor) -> None:
        self.state_mean.copy_(states.mean(0))
        self.state_std.copy_(states.std(0).clamp(min=1e-6))

    def forward(self, observations: Mapping[str, Any], actions: torch.Tensor) -> torch.Tensor:
        s = (observations[self.state_key].to(self.state_mean.dtype) - self.state_mean) / self.state_std
        a = actions.reshape(actions.shape[0], -1).to(s.dtype)
        if a.shape[1] != self.horizon * self.action_dim:
            raise MmttsError(f"this scorer takes actions of {self.horizon} x {self.action_dim}; got "
                             f"{tuple(actions.shape[1:])}")
        return self.net(torch.cat([s, a], 1)).squeeze(1)
