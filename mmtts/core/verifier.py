"""Verifiers: score a batch of outputs, higher is better, one score per candidate, in order.

Every verifier call goes through :meth:`Verifier.__call__`, which checks the
scores: the wrong number is an error, and non-finite scores (NaN, +-inf) are
by default ranked last (replaced by -inf) with a warning naming how many, or
raise with ``nonfinite="error"``. A NaN never reaches a selection step.
"""

from __future__ import annotations

import hashlib
import warnings
from abc import ABC, abstractmethod
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy.stats import rankdata

from .batch import batch_size, take
from .errors import VerifierError

NONFINITE_POLICIES = ("last", "error")


class NonFiniteScoreWarning(RuntimeWarning):
    """Some candidates got NaN or infinite scores and were ranked last."""


def check_scores(scores: Any, n: int, name: str, nonfinite: str = "last") -> torch.Tensor:
    """Validate raw verifier output into a float64 CPU tensor of shape (n,)."""
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite={nonfinite!r}; choose one of {NONFINITE_POLICIES}")
    try:
        s = torch.as_tensor(np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores,
                                       dtype=np.float64))
    except (TypeError, ValueError) as e:
        raise VerifierError(f"verifier {name!r} returned {type(scores).__name__}, not numbers: {e}") from None
    if s.ndim == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if s.ndim != 1 or s.shape[0] != n:
        raise VerifierError(
            f"verifier {name!r} returned scores of shape {tuple(s.shape)} for {n} candidates; "
            f"it must return one score per candidate, in order (shape ({n},))"
        )
    bad = ~torch.isfinite(s)
    if bad.any():
        k = int(bad.sum())
        if nonfinite == "error":
            raise VerifierError(
                f"verifier {name!r} returned {k} non-finite score(s) of {n} (NaN or inf); "
                "fix the verifier or pass nonfinite='last' to rank them last"
            )
        warnings.warn(
            f"verifier {name!r} returned {k} non-finite score(s) of {n}; those candidates are ranked last",
            NonFiniteScoreWarning, stacklevel=3,
        )
        s = s.masked_fill(bad, float("-inf"))
    return s


class Verifier(ABC):
    """Base class. Subclasses implement :meth:`score`; callers use ``verifier(outputs, context)``.

    ``context`` carries the conditioning of each candidate (class labels,
    prompts, observations), as the process provides it. ``cost`` is the
    relative cost of scoring one candidate, for reports.
    """

    name: str = "verifier"
    cost: float = 1.0

    def __init__(self, nonfinite: str = "last"):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite={nonfinite!r}; choose one of {NONFINITE_POLICIES}")
        self.nonfinite = nonfinite
        self._evaluations = 0

    @abstractmethod
    def score(self, outputs: Any, context: Any = None) -> torch.Tensor:
        """Raw scores for a batch of outputs (higher is better)."""

    @property
    def evaluations(self) -> int:
        """Candidate evaluations performed by underlying models (cache hits excluded)."""
        return self._evaluations

    def __call__(self, outputs: Any, context: Any = None) -> torch.Tensor:
        n = batch_size(outputs)
        if n == 0:
            return torch.empty(0, dtype=torch.float64)
        raw = self.score(outputs, context)
        self._evaluations += n
        return check_scores(raw, n, self.name, self.nonfinite)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class FunctionVerifier(Verifier):
    """Wrap a plain function ``fn(outputs, context) -> scores`` (or ``fn(outputs)``)."""

    def __init__(self, fn: Callable, name: str | None = None, cost: float = 1.0, nonfinite: str = "last",
                 takes_context: bool = False):
        super().__init__(nonfinite)
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "function")
        self.cost = cost
        self.takes_context = takes_context

    def score(self, outputs, context=None):
        return self.fn(outputs, context) if self.takes_context else self.fn(outputs)


def as_verifier(v: Verifier | Callable, name: str | None = None) -> Verifier:
    if isinstance(v, Verifier):
        return v
    if callable(v):
        return FunctionVerifier(v, name=name)
    raise TypeError(f"expected a Verifier or a callable, not {type(v).__name__}")


def ranks01(scores: torch.Tensor) -> torch.Tensor:
    """Ranks scaled to [0, 1] (ties averaged; -inf ranks lowest); a batch of one ranks 1."""
    n = scores.numel()
    if n == 1:
        return torch.ones(1, dtype=torch.float64)
    r = rankdata(scores.numpy(), method="average")
    return torch.as_tensor((r - 1.0) / (n - 1.0), dtype=torch.float64)


class MeanRank(Verifier):
    """Ensemble by weighted mean rank within the batch.

    Ranks make verifiers with different scales comparable; the ensemble's
    scores are relative to the batch scored together (as with any rank), so
    strategies that compare across batches should score the union.
    """

    def __init__(self, verifiers: Sequence[Verifier | Callable], weights: Sequence[float] | None = None,
                 name: str | None = None):
        super().__init__("last")
        if not verifiers:
            raise ValueError("MeanRank needs at least one verifier")
        self.verifiers = [as_verifier(v) for v in verifiers]
        w = np.ones(len(self.verifiers)) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (len(self.verifiers),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights {list(w)} must be {len(self.verifiers)} non-negative numbers, not all zero")
        self.weights = torch.as_tensor(w / w.sum())
        self.name = name or "mean-rank(" + ",".join(v.name for v in self.verifiers) + ")"
        self.cost = float(sum(v.cost for v in self.verifiers))

    @property
    def evaluations(self) -> int:
        return sum(v.evaluations for v in self.verifiers)

    def score(self, outputs, context=None):
        ranks = torch.stack([ranks01(v(outputs, context)) for v in self.verifiers])
        return (self.weights[:, None] * ranks).sum(0)

    def __call__(self, outputs, context=None):
        n = batch_size(outputs)
        if n == 0:
            return torch.empty(0, dtype=torch.float64)
        return check_scores(self.score(outputs, context), n, self.name, "error")


def content_key(item: Any) -> str:
    """A digest of one candidate's content (tensor bytes, shape and dtype; or its repr)."""
    h = hashlib.sha1()
    if isinstance(item, torch.Tensor):
        t = item.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    elif isinstance(item, dict):
        for k in sorted(item):
            h.update(k.encode())
            h.update(content_key(item[k]).encode())
    else:
        h.update(repr(item).encode())
    return h.hexdigest()


class Cached(Verifier):
    """Memoise a verifier per candidate, so re-scoring a survivor is free.

    The key of a candidate is ``key(output_i, context_i)``; by default a digest
    of its content and its context. Only misses reach the inner verifier, and
    only misses count as evaluations.
    """

    def __init__(self, verifier: Verifier | Callable, key: Callable | None = None, max_items: int | None = None):
        super().__init__("last")
        self.inner = as_verifier(verifier)
        self.name = f"cached({self.inner.name})"
        self.cost = self.inner.cost
        self.key = key or (lambda out, ctx: content_key(out) + (content_key(ctx) if ctx is not None else ""))
        self.max_items = max_items
        self._store: dict[str, float] = {}
        self.hits = 0

    @property
    def evaluations(self) -> int:
        return self.inner.evaluations

    def _context_item(self, context, i):
        if context is None:
            return None
        try:
            return take(context, [i])
        except TypeError:
            return context

    def score(self, outputs, context=None):
        n = batch_size(outputs)
        keys = [self.key(take(outputs, [i]), self._context_item(context, i)) for i in range(n)]
        missing = [i for i, k in enumerate(keys) if k not in self._store]
        missing_unique: dict[str, int] = {}
        for i in missing:
            missing_unique.setdefault(keys[i], i)
        if missing_unique:
            idx = list(missing_unique.values())
            sub_ctx = None if context is None else (take(context, idx) if _indexable(context) else context)
            fresh = self.inner(take(outputs, idx), sub_ctx)
            for i, s in zip(idx, fresh.tolist()):
                self._store[keys[i]] = s
            if self.max_items is not None:
                while len(self._store) > self.max_items:
                    self._store.pop(next(iter(self._store)))
        self.hits += n - len(missing_unique)
        return torch.tensor([self._store[k] for k in keys], dtype=torch.float64)

    def __call__(self, outputs, context=None):
        n = batch_size(outputs)
        if n == 0:
            return torch.empty(0, dtype=torch.float64)
        return self.score(outputs, context)


def _indexable(x) -> bool:
    return isinstance(x, (torch.Tensor, list, tuple, dict))
