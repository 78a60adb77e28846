"""Action verifiers: score (observation, instruction, action) triples, higher is better.

``ActionVerifier`` is a core :class:`~mmtts.core.Verifier`: it implements
``score`` only, so every call gets the core's checks (one finite score per
candidate, NaN ranked last) and counting, and it combines with ``MeanRank``
and ``Cached`` like any other verifier. The candidates are its outputs and
the observations are its context, one row per candidate, scored in one
batched forward.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
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

    Args:
        scorer: ``scorer(observations, actions) -> (M,)`` scores, higher is better (e.g. an
            ``MLPActionScorer`` or, for speed, its ``folded()`` copy).
        name: the verifier's name in reports.
        nonfinite: ``"last"`` ranks NaN/inf scores last, ``"error"`` raises.
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
        acts = outputs if outputs.ndim == 3 else outputs.unsqueeze(1)
        try:
            return self.scorer(context, acts).reshape(-1)
        except MmttsError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as e:
            if isinstance(e, torch.OutOfMemoryError):
                raise
            raise MmttsError(f"the scorer of {self.name!r} failed on {tuple(acts.shape)} actions and the "
                             f"observations {_shapes(context)}: {type(e).__name__}: {e}") from e


def _shapes(batch: Mapping) -> dict:
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in batch.items()}


class QuadraticFeatures(nn.Module):
    """A fixed quadratic map of the state, ``f(x) = L x + Q (x outer x)``: (M, S) -> (M, F).

    Selections, sums and differences are its linear part; products, such as a
    vector turned into the frame of an observed angle (``cos a * x + sin a * y``),
    its quadratic part. Because the map is fixed, a scorer folds it into its
    first layer when scoring.

    Args:
        linear: (F, S) linear part L.
        quadratic: (F, S, S) quadratic part Q; zeros when None.
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
    weights in a safetensors state dict. :meth:`folded` gives an inference
    copy with the feature map and the standardisation folded into the first
    layer, which saves their operations on every call.

    Args:
        state_dim: S, the length of the state per observation.
        action_dim: D.
        horizon: H, actions per chunk.
        hidden: width of the two hidden layers.
        state_key: where the state lies in the observation batch.
        features: an optional fixed feature map of the state.
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

    def set_normalisation(self, states: torch.Tensor) -> None:
        """Standardise by the mean and standard deviation of (the features of) ``states`` (M, S)."""
        if self.features is not None:
            states = self.features(states.to(self.state_mean.dtype))
        self.state_mean.copy_(states.mean(0))
        self.state_std.copy_(states.std(0).clamp(min=1e-6))

    @torch.no_grad()
    def folded(self) -> "FoldedActionScorer":
        """An inference copy of the scorer as it is now, the standardisation and the feature map folded into
        the first layer (build it again after changing the weights)."""
        first, second, last = self.net[0], self.net[2], self.net[4]
        w1, b1, mean, std = first.weight, first.bias, self.state_mean, self.state_std
        n = mean.shape[0]
        w_state = w1[:, :n] / std
        if self.features is not None:
            f = self.features
            w_state = torch.cat([w_state @ f.linear, w_state @ f.quadratic.flatten(1)], 1)
        return FoldedActionScorer(torch.cat([w_state, w1[:, n:]], 1), b1 - (w1[:, :n] / std) @ mean,
                                  second.weight, second.bias, last.weight, last.bias, self.state_key,
                                  self.horizon, self.action_dim, quadratic=self.features is not None)

    def forward(self, observations: Mapping[str, Any], actions: torch.Tensor) -> torch.Tensor:
        s, a = _state_and_actions(observations, actions, self.state_key, self.state_mean.dtype, self.horizon,
                                  self.action_dim)
        x = s if self.features is None else self.features(s)
        return self.net(torch.cat([(x - self.state_mean) / self.state_std, a], 1)).view(-1)


class FoldedActionScorer(nn.Module):
    """:class:`MLPActionScorer` for inference: the first layer reads the raw state (and, with quadratic
    features, the state's pairwise products) followed by the action. Built by ``MLPActionScorer.folded()``.

    Args:
        w1, b1, w2, b2, w3, b3: the three layers' weights and biases, the first one folded.
        state_key: where the state lies in the observation batch.
        horizon: H, actions per chunk.
        action_dim: D.
        quadratic: whether the first layer also reads the state's pairwise products.
    """

    def __init__(self, w1, b1, w2, b2, w3, b3, state_key: str = STATE_KEY, horizon: int = 1, action_dim: int = 1,
                 quadratic: bool = False):
        super().__init__()
        for name, t in zip(("w1", "b1", "w2", "b2", "w3", "b3"), (w1, b1, w2, b2, w3, b3)):
            self.register_buffer(name, t.detach().clone())
        self.state_key, self.horizon, self.action_dim, self.quadratic = state_key, horizon, action_dim, quadratic

    def forward(self, observations: Mapping[str, Any], actions: torch.Tensor) -> torch.Tensor:
        s, a = _state_and_actions(observations, actions, self.state_key, self.w1.dtype, self.horizon,
                                  self.action_dim)
        x = torch.cat([s, a] if not self.quadratic else [s, QuadraticFeatures.outer(s), a], 1)
        return F.linear(F.silu(F.linear(F.silu(F.linear(x, self.w1, self.b1)), self.w2, self.b2)),
                        self.w3, self.b3).view(-1)


def _state_and_actions(observations, actions, state_key, dtype, horizon, action_dim):
    """The state (M, S) and the flattened actions (M, H * D) in ``dtype``, checked against the scorer's sizes."""
    s = observations[state_key]
    if s.dtype != dtype:
        s = s.to(dtype)
    a = actions.reshape(actions.shape[0], -1)
    if a.shape[1] != horizon * action_dim:
        raise MmttsError(f"this scorer takes actions of {horizon} x {action_dim}; got {tuple(actions.shape[1:])}")
    if a.dtype != s.dtype:
        a = a.to(s.dtype)
    return s, a
