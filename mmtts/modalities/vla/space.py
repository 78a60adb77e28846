"""The action space a wrapper perturbs within: bounds and which dimensions are discrete.

The Gaussian augmentation treats every dimension as continuous; a gripper
that is either open or closed must stay a valid command, so discrete
dimensions are set by vote instead, and every candidate is clipped to the
bounds the robot accepts.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

from ...core.errors import MmttsError
from ...core.settings import whole


@dataclass(frozen=True)
class ActionSpace:
    """Per-dimension action bounds and the indices of binary dimensions.

    A binary dimension takes the value ``low`` or ``high`` (a gripper's 0 and
    1); a sample votes for ``high`` when it lies at or above the midpoint.

    Attributes:
        low: (D,) lower bounds.
        high: (D,) upper bounds.
        discrete: indices of the binary dimensions.
    """

    low: tuple[float, ...]
    high: tuple[float, ...]
    discrete: tuple[int, ...] = ()

    def __post_init__(self):
        try:
            lo = torch.as_tensor(self.low, dtype=torch.float64)
            hi = torch.as_tensor(self.high, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise MmttsError(f"action bounds must be numbers, one per action dimension; got low={self.low!r}, "
                             f"high={self.high!r}") from None
        if lo.ndim != 1 or lo.shape != hi.shape or lo.numel() == 0:
            raise MmttsError(f"action bounds low {tuple(lo.shape)} and high {tuple(hi.shape)} must be two "
                             "non-empty vectors of the same length, one entry per action dimension")
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()) or (hi <= lo).any():
            raise MmttsError(f"action bounds must be finite with high > low in every dimension; got low={self.low}, "
                             f"high={self.high}")
        bad = [i for i in self.discrete if isinstance(i, bool) or not isinstance(i, numbers.Integral)
               or not 0 <= i < lo.numel()]
        if bad:
            raise MmttsError(f"discrete dimensions {bad} are not indices of the {lo.numel()} action dimensions "
                             f"(whole numbers from 0 to {lo.numel() - 1})")

    @classmethod
    def box(cls, low: Sequence[float] | float, high: Sequence[float] | float, dim: int | None = None,
            discrete: Sequence[int] = ()) -> "ActionSpace":
        """Bounds as sequences, or as scalars repeated over ``dim`` dimensions."""
        if dim is not None:
            dim = whole("dim", dim, "ActionSpace.box")
            low = [low] * dim if isinstance(low, numbers.Real) else low
            high = [high] * dim if isinstance(high, numbers.Real) else high
        try:
            low, high = tuple(float(v) for v in low), tuple(float(v) for v in high)
        except (TypeError, ValueError):
            raise MmttsError(f"action bounds must be numbers (or sequences of numbers); got low={low!r}, "
                             f"high={high!r}") from None
        try:
            discrete = tuple(i if isinstance(i, bool) else int(i) if float(i).is_integer() else i for i in discrete)
        except (TypeError, ValueError):
            raise MmttsError(f"discrete={discrete!r} must be a sequence of action dimension indices") from None
        return cls(low, high, discrete)

    @classmethod
    def from_gym(cls, space, discrete: Sequence[int] = ()) -> "ActionSpace":
        """The bounds of a gymnasium ``Box`` action space (1-D)."""
        low, high = getattr(space, "low", None), getattr(space, "high", None)
        if low is None or high is None or len(getattr(space, "shape", ())) != 1:
            raise MmttsError(f"expected a 1-D gymnasium Box action space, got {space!r}")
        return cls.box(low.tolist(), high.tolist(), discrete=discrete)

    @property
    def dim(self) -> int:
        return len(self.low)

    def bounds(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The bounds as tensors of ``like``'s dtype and device (kept, since a control loop asks every step)."""
        cache = self.__dict__.setdefault("_bounds", {})
        key = (like.dtype, like.device)
        if key not in cache:
            cache[key] = (torch.as_tensor(self.low).to(dtype=like.dtype, device=like.device),
                          torch.as_tensor(self.high).to(dtype=like.dtype, device=like.device))
        return cache[key]

    def clip(self, actions: torch.Tensor) -> torch.Tensor:
        """Clip (..., D) actions to the bounds."""
        lo, hi = self.bounds(actions)
        return torch.clamp(actions, lo, hi)

    def vote(self, samples: torch.Tensor, valid: torch.Tensor | None = None, rule: str = "majority") -> torch.Tensor:
        """The value of each discrete dimension over the sample axis: (B, N, H, D) -> (B, H, len(discrete)).

        Only samples marked ``valid`` (B, N) vote. ``rule="majority"``: ``high``
        when at least half of the samples lie in the upper half of the range
        (ties go to ``high``). ``rule="mean"``: ``high`` when the samples' mean
        does (the published RoboMonkey rule, mean >= 0.5 for a {0, 1} gripper);
        the two differ on even-N ties such as {0.0, 0.99608}.
        """
        if rule not in ("majority", "mean"):
            raise MmttsError(f"unknown vote rule {rule!r}; choose 'majority' or 'mean'")
        idx = list(self.discrete)
        lo, hi = self.bounds(samples)
        lo, hi = lo[idx], hi[idx]
        if valid is None:
            valid = torch.ones(samples.shape[:2], dtype=torch.bool, device=samples.device)
        w = valid.to(samples.dtype)[:, :, None, None]
        x = samples[..., idx]
        if rule == "mean":
            return torch.where((w * x).sum(1) / w.sum(1) >= (lo + hi) / 2, hi, lo)
        share = (w * (x >= (lo + hi) / 2).to(samples.dtype)).sum(1) / w.sum(1)
        return torch.where(share >= 0.5, hi, lo)
