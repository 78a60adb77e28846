"""Gaussian action augmentation: turn a few policy samples into many cheap candidates.

A policy forward is the expensive part of a control step; drawing from a
Gaussian fitted to N samples is nearly free. RoboMonkey therefore samples N
actions (5 to 9), fits a diagonal Gaussian to them, draws K candidates
(16 to 32) from it, sets discrete dimensions by majority vote, clips to the
action bounds and removes duplicates. When one distinct action is left there
is nothing to choose, and the verifier is skipped. The standard normal draws
come from the caller (the ``robomonkey`` strategy draws them from the
candidates' random streams).

Everything is batched over the B observations of a control step: the
candidates stay in one padded (B, K, H, D) tensor with a (B, K) mask of the
distinct ones, so no step loops over observations in Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.errors import MmttsError
from ...core.settings import whole
from .space import ActionSpace

PAIRWISE_LIMIT = 1 << 20  # compare all pairs below this many element comparisons, sort above


@dataclass
class Candidates:
    """The candidates of each observation, padded, with a mask of the distinct ones.

    A kept row is the first valid occurrence of its value, so the distinct
    candidates of an observation are ``draws[b][keep[b]]``, in draw order
    (slot 0 is always kept, unless it is an invalid sample of ``SampleSet``).
    ``keep`` is ``None`` when every row is distinct and valid, the usual case.

    Attributes:
        draws: (B, K, H, D) candidate action chunks, padded.
        keep: (B, K) bool marking the distinct ones, or None when all are kept.
        mean: (B, H, D) fitted mean.
        std: (B, H, D) fitted standard deviation.
    """

    draws: torch.Tensor  # (B, K, H, D)
    keep: torch.Tensor | None  # (B, K) bool, None: all kept
    mean: torch.Tensor  # (B, H, D) fitted mean
    std: torch.Tensor  # (B, H, D) fitted standard deviation

    @property
    def var(self) -> torch.Tensor:
        """(B, H, D) fitted (unbiased) variance."""
        return self.std ** 2

    @property
    def mask(self) -> torch.Tensor:
        """(B, K) bool: the distinct candidates, also when every one is."""
        if self.keep is None:
            return torch.ones(self.draws.shape[:2], dtype=torch.bool, device=self.draws.device)
        return self.keep

    @property
    def count(self) -> torch.Tensor:
        """Distinct candidates per observation, (B,) int64."""
        return self.mask.sum(1)

    @property
    def actions(self) -> list[torch.Tensor]:
        """The distinct candidates per observation: a list of (M_b, H, D)."""
        if self.keep is None:
            return list(self.draws)
        return [d[k] for d, k in zip(self.draws, self.keep)]

    @property
    def counts(self) -> list[int]:
        return self.count.tolist()

    @property
    def early_exit(self) -> list[bool]:
        """Observations left with one distinct action: no verifier call needed."""
        return (self.count == 1).tolist()


def check_decimals(decimals) -> int | None:
    """The rounding before de-duplication: a whole number of decimals (negative rounds to tens, hundreds...)
    or None."""
    return whole("decimals", decimals, "action de-duplication", minimum=-300, none=True)


def distinct_rows(rows: torch.Tensor, decimals: int | None = None,
                  valid: torch.Tensor | None = None) -> torch.Tensor | None:
    """:func:`first_unique_mask`, or ``None`` when every row is distinct and valid (checked in four operations
    for small sets, the usual case)."""
    g, m, f = rows.shape
    if valid is None and g * m * m * f <= PAIRWISE_LIMIT:
        key = rows if decimals is None else torch.round(rows, decimals=decimals)
        earlier_equal = (key.unsqueeze(2) == key.unsqueeze(1)).all(3).tril_(-1)  # [g, i, j]: row i repeats row j < i
        if not bool(earlier_equal.any()):
            return None
        return ~earlier_equal.any(2)
    keep = first_unique_mask(rows, decimals, valid)
    return None if bool(keep.all()) else keep


def first_unique_mask(rows: torch.Tensor, decimals: int | None = None,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mark the first occurrence of each distinct row within each group: (G, M, F) -> (G, M) bool.

    Rows are compared only with the rows of their own group (observation).
    ``valid`` (G, M) excludes rows: they are never kept and hide nothing.
    ``decimals`` rounds before comparing. Small sets (the usual K <= 64)
    compare all pairs of every group at once; large ones sort all groups in
    one ``torch.unique`` over the rows tagged with their group.
    """
    key = rows if decimals is None else torch.round(rows, decimals=decimals)
    g, m, f = key.shape
    if g * m * m * f <= PAIRWISE_LIMIT:
        same = (key.unsqueeze(2) == key.unsqueeze(1)).all(3)  # (G, M, M): row i equals row j
        if valid is not None:
            same &= valid[:, None]
        keep = ~same.tril_(-1).any(2)  # no equal row before it
        return keep if valid is None else keep & valid
    # tag each row with its group; float64 holds both the tag and any float32 key exactly
    group = torch.arange(g, device=key.device, dtype=torch.float64)[:, None, None].expand(g, m, 1)
    tagged = torch.cat([group, key.to(torch.float64)], 2).reshape(g * m, f + 1)
    _, inverse = torch.unique(tagged, dim=0, return_inverse=True)
    position = torch.arange(g * m, device=key.device)
    if valid is not None:  # an excluded row can never be the first of its value
        position = torch.where(valid.reshape(-1), position, g * m)
    first = torch.full((int(inverse.max()) + 1,), g * m, dtype=torch.int64, device=key.device)
    first.scatter_reduce_(0, inverse, position, reduce="amin")
    keep = (first[inverse] == torch.arange(g * m, device=key.device)).reshape(g, m)
    return keep if valid is None else keep & valid


def first_unique(rows: torch.Tensor, decimals: int | None = None) -> torch.Tensor:
    """Indices of the first occurrence of each distinct row of ``rows`` (M, F), in their original order."""
    return first_unique_mask(rows[None], decimals)[0].nonzero().flatten()


class GaussianAugmenter:
    """Fit a diagonal Gaussian per observation to N samples and turn K standard normal draws into candidates.

    The variance is the unbiased sample variance (zero for a single sample,
    so one sample yields one candidate). Discrete dimensions are set by the
    samples' majority vote, every candidate is clipped to the bounds, and
    duplicates are marked.

    With ``published=True`` it follows the published RoboMonkey code instead:
    the variance divides by N (``np.var``), a discrete dimension is ``high``
    when the samples' mean is in the upper half of its range, and when all of
    an observation's valid samples are equal its candidates are that raw sample
    (neither voted nor clipped).

    Args:
        space: the bounds and discrete dimensions.
        decimals: round before de-duplication (``None``: exact duplicates only).
        published: the published construction (see above) instead of mmtts's.
        tokenizer: an :class:`~mmtts.modalities.vla.tokens.ActionTokenizer`: candidates whose actions fall in
            the same bins of every dimension are duplicates (the published de-duplication for token VLAs);
            ``decimals`` is then unused.
    """

    def __init__(self, space: ActionSpace, decimals: int | None = None, published: bool = False,
                 tokenizer=None):
        self.space = space
        self.decimals = check_decimals(decimals)
        self.published = bool(published)
        from .tokens import ActionTokenizer

        if tokenizer is not None and not isinstance(tokenizer, ActionTokenizer):
            raise MmttsError(f"tokenizer must be an ActionTokenizer (with encode(actions) -> bin ids); got "
                             f"{type(tokenizer).__name__}")
        self.tokenizer = tokenizer

    @staticmethod
    def fit(samples: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and unbiased variance over the valid samples of (B, N, H, D).

        ``valid`` (B, N) marks the samples to use (``None``: all); an
        observation with one valid sample gets zero variance.
        """
        mean, std = GaussianAugmenter.fit_std(samples, valid)
        return mean, std ** 2

    @staticmethod
    def fit_std(samples: torch.Tensor, valid: torch.Tensor | None = None,
                ddof: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and standard deviation (square root of the variance dividing by N - ``ddof``: 1,
        unbiased, by default; 0 as ``np.var``), as :meth:`fit`."""
        if valid is None:
            if samples.shape[1] == 1:
                return samples[:, 0], torch.zeros_like(samples[:, 0])
            std, mean = torch.std_mean(samples, 1, correction=ddof)
            return mean, std
        w = valid.to(samples.dtype)[:, :, None, None]
        x = torch.where(w > 0, samples, torch.zeros_like(samples))
        n = w.sum(1)
        mean = (w * x).sum(1) / n
        var = (w * (x - mean[:, None]) ** 2).sum(1) / (n - ddof).clamp(min=1)
        return mean, var.sqrt()

    @staticmethod
    def draw(mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Gaussian draws ``mean + std * noise`` for standard normal ``noise`` (B, K, H, D), before voting and
        clipping."""
        if noise.device != mean.device or noise.dtype != mean.dtype:
            noise = noise.to(mean.device, mean.dtype)
        return torch.addcmul(mean.unsqueeze(1), std.unsqueeze(1), noise)

    def __call__(self, samples: torch.Tensor, noise: torch.Tensor,
                 valid: torch.Tensor | None = None) -> Candidates:
        """Candidates from ``samples`` (B, N, H, D) and standard normal ``noise`` (B, K, H, D)."""
        if samples.ndim != 4:
            raise MmttsError(f"samples must be (batch, N, horizon, action_dim); got shape {tuple(samples.shape)}")
        if samples.shape[-1] != self.space.dim:
            raise MmttsError(f"samples have {samples.shape[-1]} action dimensions; the action space has "
                             f"{self.space.dim}")
        if noise.ndim != 4 or noise.shape[0] != samples.shape[0] or noise.shape[2:] != samples.shape[2:]:
            raise MmttsError(f"noise must be (batch, K, horizon, action_dim) = ({samples.shape[0]}, K, "
                             f"{', '.join(map(str, samples.shape[2:]))}); got {tuple(noise.shape)}")
        mean, std = self.fit_std(samples, valid, ddof=0 if self.published else 1)
        draws = self.draw(mean, std, noise)
        if self.space.discrete:
            idx = list(self.space.discrete)
            rule = "mean" if self.published else "majority"
            draws[..., idx] = self.space.vote(samples, valid, rule)[:, None].expand(-1, draws.shape[1], -1, -1)
        draws = self.space.clip(draws)
        if self.published:  # all valid samples equal: the raw sample, neither voted nor clipped
            ok = torch.ones(samples.shape[:2], dtype=torch.bool, device=samples.device) if valid is None else valid
            first = samples[torch.arange(samples.shape[0]), ok.to(torch.int64).argmax(1)]  # a valid sample
            same = ((samples == first[:, None]) | ~ok[:, :, None, None]).flatten(2).all(-1).all(-1)
            draws = torch.where(same[:, None, None, None], first[:, None].expand_as(draws), draws)
        if self.tokenizer is not None:
            keep = distinct_rows(self.tokenizer.encode(draws).flatten(2))
        else:
            keep = distinct_rows(draws.flatten(2), self.decimals)
        return Candidates(draws, keep, mean, std)


class SampleSet:
    """No augmentation: the candidates are the policy's own valid samples, clipped and de-duplicated.

    The ablation of the Gaussian step (and what to use when every candidate
    must come from the policy itself): K equals N, and each candidate costs
    a policy sample.

    Args:
        space: the bounds to clip to.
        decimals: round before de-duplication (``None``: exact duplicates only).
    """

    def __init__(self, space: ActionSpace, decimals: int | None = None):
        self.space, self.decimals = space, check_decimals(decimals)

    def __call__(self, samples: torch.Tensor, valid: torch.Tensor | None = None) -> Candidates:
        mean, std = GaussianAugmenter.fit_std(samples, valid)
        clipped = self.space.clip(samples)
        return Candidates(clipped, distinct_rows(clipped.flatten(2), self.decimals, valid), mean, std)
