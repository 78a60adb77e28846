"""Gaussian action augmentation: turn a few policy samples into many cheap candidates.

A policy forward is the expensive part of a control step; drawing from a
Gaussian fitted to N samples is nearly free. RoboMonkey therefore samples N
actions (5 to 9), fits a diagonal Gaussian to them, draws K candidates
(16 to 32) from it, sets discrete dimensions by majority vote, clips to the
action bounds and removes duplicates. When one distinct action is left there
is nothing to choose, and the verifier is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.errors import MmttsError
from .space import ActionSpace


@dataclass
class Candidates:
    """The distinct candidates of each observation, in draw order."""

    actions: list[torch.Tensor]  # per observation: (M_b, H, D)
    mean: torch.Tensor  # (B, H, D) fitted mean
    var: torch.Tensor  # (B, H, D) fitted variance

    @property
    def counts(self) -> list[int]:
        return [int(a.shape[0]) for a in self.actions]

    @property
    def early_exit(self) -> list[bool]:
        """Observations left with one distinct action: no verifier call needed."""
        return [c == 1 for c in self.counts]


def first_unique(rows: torch.Tensor, decimals: int | None = None) -> torch.Tensor:
    """Indices of the first occurrence of each distinct row of ``rows`` (M, F), in their original order.

    Small sets (the usual K <= 64) compare all pairs, which is several times
    faster than sorting with ``torch.unique``; large ones sort.
    """
    key = rows if decimals is None else torch.round(rows, decimals=decimals)
    m = key.shape[0]
    if m * m * key.shape[1] <= 1 << 20:
        same = (key[:, None] == key[None]).all(2)
        earlier = torch.ones(m, m, dtype=torch.bool, device=key.device).tril(-1)
        return (~(same & earlier).any(1)).nonzero().flatten()
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), m, dtype=torch.int64, device=key.device)
    first.scatter_reduce_(0, inverse, torch.arange(m, device=key.device), reduce="amin")
    return torch.sort(first).values


class GaussianAugmenter:
    """Fit a diagonal Gaussian per observation to N samples and draw K candidates from it.

    ``num_candidates`` is K. The variance is the unbiased sample variance
    (zero for a single sample, so one sample yields one candidate).
    ``decimals`` rounds before de-duplication (``None``: exact duplicates only).
    """

    def __init__(self, num_candidates: int, space: ActionSpace, decimals: int | None = None):
        if int(num_candidates) != num_candidates or num_candidates < 1:
            raise MmttsError(f"num_candidates={num_candidates!r} must be a whole number >= 1 (RoboMonkey uses 16-32)")
        self.num_candidates = int(num_candidates)
        self.space = space
        self.decimals = decimals

    @staticmethod
    def fit(samples: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and unbiased variance over the valid samples of (B, N, H, D).

        ``valid`` (B, N) marks the samples to use (default: all); an
        observation with one valid sample gets zero variance.
        """
        if valid is None or bool(valid.all()):
            if samples.shape[1] == 1:
                return samples[:, 0], torch.zeros_like(samples[:, 0])
            return samples.mean(1), samples.var(1)
        w = valid.to(samples.dtype)[:, :, None, None]
        x = torch.where(w > 0, samples, torch.zeros_like(samples))
        n = w.sum(1)
        mean = (w * x).sum(1) / n
        var = (w * (x - mean[:, None]) ** 2).sum(1) / (n - 1).clamp(min=1)
        return mean, var

    def draw(self, mean: torch.Tensor, var: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """K raw Gaussian draws per observation: (B, K, H, D), before voting and clipping."""
        b, h, d = mean.shape
        eps = torch.randn((b, self.num_candidates, h, d), generator=generator, dtype=mean.dtype)
        return mean[:, None] + var[:, None].sqrt() * eps.to(mean.device)

    def __call__(self, samples: torch.Tensor, generator: torch.Generator,
                 valid: torch.Tensor | None = None) -> Candidates:
        if samples.ndim != 4:
            raise MmttsError(f"samples must be (batch, N, horizon, action_dim); got shape {tuple(samples.shape)}")
        if samples.shape[-1] != self.space.dim:
            raise MmttsError(f"samples have {samples.shape[-1]} action dimensions; the action space has "
                             f"{self.space.dim}")
        mean, var = self.fit(samples, valid)
        draws = self.draw(mean, var, generator)
        if self.space.discrete:
            idx = list(self.space.discrete)
            draws[..., idx] = self.space.vote(samples, valid)[:, None].expand(-1, draws.shape[1], -1, -1)
        draws = self.space.clip(draws)
        actions = []
        for row in draws:
            keep = first_unique(row.reshape(row.shape[0], -1), self.decimals)
            actions.append(row[keep])
        return Candidates(actions, mean, var)


class SampleSet:
    """No augmentation: the candidates are the policy's own valid samples, clipped and de-duplicated.

    The ablation of the Gaussian step (and what to use when every candidate
    must come from the policy itself): K equals N, and each candidate costs
    a policy sample.
    """

    def __init__(self, space: ActionSpace, decimals: int | None = None):
        self.space, self.decimals = space, decimals

    def __call__(self, samples: torch.Tensor, generator: torch.Generator,
                 valid: torch.Tensor | None = None) -> Candidates:
        if valid is None:
            valid = torch.ones(samples.shape[:2], dtype=torch.bool, device=samples.device)
        mean, var = GaussianAugmenter.fit(samples, valid)
        clipped = self.space.clip(samples)
        actions = []
        for row, ok in zip(clipped, valid):
            row = row[ok]
            actions.append(row[first_unique(row.reshape(row.shape[0], -1), self.decimals)])
        return Candidates(actions, mean, var)
