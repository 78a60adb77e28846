"""The proposer: N actions per observation from a sampling policy, in one batched call.

It is also the gate for what a policy returns: the shape must match the
action space, and a sample with a NaN or inf is dropped (and counted) rather
than averaged into the Gaussian, where a single NaN would poison every
candidate. An observation left with no valid sample is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.errors import MmttsError
from .policy import SamplingPolicy, all_finite
from .space import ActionSpace


class NoValidActionError(MmttsError):
    """Every sample the policy drew for some observation was NaN or infinite."""


@dataclass
class Proposals:
    samples: torch.Tensor  # (B, N, H, D), invalid samples zeroed
    mask: torch.Tensor | None = None  # (B, N) bool, None when every sample is valid (the common case)

    @property
    def valid(self) -> torch.Tensor:
        """(B, N) bool: which samples are finite."""
        if self.mask is None:
            return torch.ones(self.samples.shape[:2], dtype=torch.bool, device=self.samples.device)
        return self.mask

    @property
    def dropped(self) -> list[int]:
        """Invalid samples per observation."""
        if self.mask is None:
            return [0] * self.samples.shape[0]
        return (~self.mask).sum(1).tolist()

    def first(self) -> torch.Tensor:
        """The first valid sample of each observation, untouched: the anytime fallback (B, H, D)."""
        if self.mask is None:
            return self.samples[:, 0]
        idx = self.mask.to(torch.int64).argmax(1)
        return self.samples[torch.arange(self.samples.shape[0]), idx]


class Proposer:
    """Draw ``num_samples`` actions per observation from ``policy`` and check them against ``space``."""

    def __init__(self, policy: SamplingPolicy, num_samples: int, space: ActionSpace):
        if not hasattr(policy, "sample_actions"):
            raise MmttsError(f"{type(policy).__name__} cannot sample: wrap it in GaussianPolicy, NoisePolicy or "
                             "TokenActionPolicy, or give it sample_actions(batch, num_samples, generator)")
        if int(num_samples) != num_samples or num_samples < 1:
            raise MmttsError(f"num_samples={num_samples!r} must be a whole number >= 1 (RoboMonkey uses 5-9)")
        self.policy, self.num_samples, self.space = policy, int(num_samples), space

    def __call__(self, batch, rows: int, generator: torch.Generator) -> Proposals:
        out = self.policy.sample_actions(batch, self.num_samples, generator)
        if not isinstance(out, torch.Tensor):
            raise MmttsError(f"sample_actions returned {type(out).__name__}; it must return a tensor")
        if out.ndim == 3:
            out = out[:, :, None]
        if out.ndim != 4 or out.shape[:2] != (rows, self.num_samples) or out.shape[-1] != self.space.dim:
            raise MmttsError(f"sample_actions returned shape {tuple(out.shape)}; expected ({rows}, {self.num_samples}, "
                             f"{self.space.dim}) or ({rows}, {self.num_samples}, horizon, {self.space.dim}) for "
                             f"{rows} observations, {self.num_samples} samples and {self.space.dim} action dimensions")
        out = out.detach()
        if not out.is_floating_point() or all_finite(out):  # one reduction in the common case
            return Proposals(out)
        valid = torch.isfinite(out).flatten(2).all(2)
        empty = (~valid.any(1)).nonzero().flatten().tolist()
        if empty:
            raise NoValidActionError(
                f"the policy returned only NaN/inf actions for observation(s) {empty} ({self.num_samples} samples "
                "each); check its inputs and weights, or draw more samples so that some are valid")
        return Proposals(torch.where(valid[:, :, None, None], out, torch.zeros_like(out)), valid)
