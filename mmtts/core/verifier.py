"""Verifiers: score a batch of outputs, higher is better, one score per candidate, in order.

Every verifier call goes through :meth:`Verifier.__call__`, which subclasses
never override: it counts the evaluations and checks the scores. The wrong
number of scores is an error, and non-finite scores (NaN, +-inf) are by
default ranked last (replaced by -inf) with a warning naming how many, or
raise with ``nonfinite="error"``. A NaN never reaches a selection step.
Subclasses implement :meth:`Verifier.score`; one that delegates to other
verifiers (an ensemble, a cache) names them in :attr:`Verifier.parts`, and its
evaluations are theirs.
"""

from __future__ import annotations

import hashlib
import inspect
import warnings
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .batch import batch_size, take
from .errors import VerifierError, call_user

NONFINITE_POLICIES = ("last", "error")


class NonFiniteScoreWarning(RuntimeWarning):
    """Some candidates got NaN or infinite scores and were ranked last."""


def check_scores(scores: Any, n: int, name: str, nonfinite: str = "last", ranked_last_ok: bool = False) -> torch.Tensor:
    """Validate raw verifier output into a float64 CPU tensor of shape (n,).

    ``ranked_last_ok`` lets -inf (a score already ranked last by the verifier
    that produced it) pass without a second warning.
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite={nonfinite!r}; choose one of {NONFINITE_POLICIES}")
    if isinstance(scores, torch.Tensor) and scores.is_floating_point():
        s = scores.detach().to("cpu", torch.float64)
    else:
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
    if bool(torch.isfinite(s).all()):
        return s
    bad = torch.isnan(s) | (s == float("inf")) if ranked_last_ok else ~torch.isfinite(s)
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
    """Base class: scores a batch of outputs, higher is better, one score per candidate, in order.

    Subclasses implement :meth:`score` and never override ``__call__``:
    callers use ``verifier(outputs, context)``, which counts the evaluations
    and validates the scores. ``context`` carries the conditioning of each
    candidate (class labels, prompts, observations), as the process provides
    it. ``cost`` is the relative cost of scoring one candidate, for reports.

    Args:
        nonfinite: what a NaN or infinite score does: ``"last"`` ranks it last (-inf) with a warning,
            ``"error"`` raises.
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
    def parts(self) -> tuple["Verifier", ...]:
        """The verifiers this one delegates its evaluations to (an ensemble's members, a cache's inner one).

        Empty (the default) for a verifier that runs its own model: each call
        then counts one evaluation per candidate. A verifier with parts counts
        none itself; its :attr:`evaluations` are the sum of its parts', so a
        cache hit costs nothing and an ensemble costs what its members ran.
        """
        return ()

    @property
    def evaluations(self) -> int:
        """Candidate evaluations performed by underlying models (cache hits excluded)."""
        parts = self.parts
        return sum(v.evaluations for v in parts) if parts else self._evaluations

    def __call__(self, outputs: Any, context: Any = None) -> torch.Tensor:
        n = batch_size(outputs)
        if n == 0:
            return torch.empty(0, dtype=torch.float64)
        raw = self.score(outputs, context)
        delegated = bool(self.parts)
        if not delegated:
            self._evaluations += n
        return check_scores(raw, n, self.name, self.nonfinite, ranked_last_ok=delegated)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class FunctionVerifier(Verifier):
    """Wrap a plain function ``fn(outputs, context) -> scores`` (or ``fn(outputs)``).

    Args:
        fn: the scoring function.
        name: the verifier's name (default: the function's).
        cost: the relative cost of scoring one candidate.
        nonfinite: see :class:`Verifier`.
        takes_context: call ``fn(outputs, context)`` instead of ``fn(outputs)``.
    """

    def __init__(self, fn: Callable, name: str | None = None, cost: float = 1.0, nonfinite: str = "last",
                 takes_context: bool = False):
        super().__init__(nonfinite)
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "function")
        self.cost = cost
        self.takes_context = takes_context

    def score(self, outputs, context=None):
        args = (outputs, context) if self.takes_context else (outputs,)
        return call_user(self.fn, *args, error=VerifierError,
                         explain=lambda e: f"verifier {self.name!r} raised {type(e).__name__}: {e}")


def _needs_context(fn: Callable) -> bool:
    """Whether ``fn`` requires two positional arguments (outputs and context)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len([p for p in positional if p.default is p.empty]) >= 2 or (
        len(positional) >= 2 and positional[1].name == "context")


def as_verifier(v: Verifier | Callable, name: str | None = None) -> Verifier:
    """``v`` itself, or a plain scoring function wrapped: ``fn(outputs)``, or ``fn(outputs, context)`` when it
    requires two arguments."""
    if isinstance(v, Verifier):
        return v
    if callable(v):
        return FunctionVerifier(v, name=name, takes_context=_needs_context(v))
    raise VerifierError(f"a verifier must be an mmtts Verifier or a scoring function, not {type(v).__name__}")


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array, ties given the mean of the ranks they span (scipy's ``rankdata``,
    ``method="average"``); -inf ranks lowest."""
    x = np.asarray(x)
    n = x.shape[0]
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])  # where each run of equal values begins
    ends = np.r_[starts[1:], n]
    mean_rank = (starts + ends + 1) / 2.0  # ranks starts+1 .. ends, averaged
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def ranks01(scores: torch.Tensor) -> torch.Tensor:
    """Ranks scaled to [0, 1] (ties averaged; -inf ranks lowest); a batch of one ranks 1."""
    n = scores.numel()
    if n == 1:
        return torch.ones(1, dtype=torch.float64)
    r = average_ranks(scores.numpy())
    return torch.as_tensor((r - 1.0) / (n - 1.0), dtype=torch.float64)


class MeanRank(Verifier):
    """Ensemble by weighted mean rank within the batch.

    Ranks make verifiers with different scales comparable; the ensemble's
    scores are relative to the batch scored together (as with any rank), so
    strategies that compare across batches should score the union. Its
    evaluations are its members'.

    Args:
        verifiers: the members (verifiers or scoring functions).
        weights: one non-negative weight per member (default: equal), normalised to sum to 1.
        name: the ensemble's name (default: ``mean-rank(member, ...)``).
    """

    def __init__(self, verifiers: Sequence[Verifier | Callable], weights: Sequence[float] | None = None,
                 name: str | None = None):
        super().__init__("error")  # ranks are always finite
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
    def parts(self) -> tuple[Verifier, ...]:
        return tuple(self.verifiers)

    def score(self, outputs, context=None):
        ranks = torch.stack([ranks01(v(outputs, context)) for v in self.verifiers])
        return (self.weights[:, None] * ranks).sum(0)


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
    only misses count as evaluations. With ``max_items`` the cache keeps the
    most recently used entries (least recently used out first).

    Args:
        verifier: the verifier (or scoring function) to memoise.
        key: ``key(output, context) -> hashable`` for one candidate (default: a content digest).
        max_items: the most entries kept (None: no limit).
    """

    def __init__(self, verifier: Verifier | Callable, key: Callable | None = None, max_items: int | None = None):
        super().__init__("last")
        if max_items is not None and (isinstance(max_items, bool) or int(max_items) != max_items or max_items < 1):
            raise ValueError(f"max_items={max_items!r} must be a whole number >= 1, or None for no limit")
        self.inner = as_verifier(verifier)
        self.name = f"cached({self.inner.name})"
        self.cost = self.inner.cost
        self.key = key or (lambda out, ctx: content_key(out) + (content_key(ctx) if ctx is not None else ""))
        self.max_items = max_items
        self._store: OrderedDict = OrderedDict()
        self.hits = 0

    @property
    def parts(self) -> tuple[Verifier, ...]:
        return (self.inner,)

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
        store = self._store
        found = {}
        missing_unique: dict = {}
        for i, k in enumerate(keys):
            if k in store:
                if k not in found:
                    store.move_to_end(k)  # a hit is a use
                    found[k] = store[k]
            else:
                missing_unique.setdefault(k, i)
        if missing_unique:
            idx = list(missing_unique.values())
            sub_ctx = None if context is None else (take(context, idx) if _indexable(context) else context)
            fresh = self.inner(take(outputs, idx), sub_ctx)
            for i, s in zip(idx, fresh.tolist()):
                found[keys[i]] = store[keys[i]] = s
            if self.max_items is not None:
                while len(store) > self.max_items:
                    store.popitem(last=False)
        self.hits += n - len(missing_unique)
        return torch.tensor([found[k] for k in keys], dtype=torch.float64)


def _indexable(x) -> bool:
    return isinstance(x, (torch.Tensor, list, tuple, dict))
