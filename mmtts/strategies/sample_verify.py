"""Sample-verify: n policy samples per observation, clipped and de-duplicated; the verifier picks one each.

The strategy searches an :class:`~mmtts.modalities.vla.process.ActionProcess`,
which answers a batch of B observations at once: every observation gets its
own candidates and its own choice, and the run returns one action (chunk)
per observation. The steps are batched over observations: the candidates
lie in one padded (B, K) layout with a mask of the distinct ones, all of
them go through the verifier in one call (or in chunks of ``chunk``), and
one selection chooses for every observation.

- With one sample (n = 1) there is nothing to choose: the policy's own
  sample is returned untouched (not clipped).
- An observation left with one distinct candidate skips the verifier.
- ``deadline_s`` is a deadline counted from the start of the search, which
  the policy's samples are always drawn by: the verifier's chunks stop once
  time is up, an observation with some candidates scored takes the best of
  those, and one with none takes its first valid policy sample. The result's
  ``extra["deadline_missed"]`` and ``extra["fallback"]`` say so. A
  ``Budget(max_seconds=...)`` stops the verifier's chunks in the same way
  once the policy has run.

``Selection.extra`` carries the tensors of the step so a control loop can
report them without recomputing anything: ``samples`` (N) and
``candidates`` (K) per observation, ``valid`` (B, N) bool or None when every
sample is finite, ``keep`` (B, K) bool marking the distinct candidates or None
when all are, ``scores`` (B, K) with -inf where nothing was scored, ``scored``
(B, K) or None when every distinct candidate was, ``index`` (B,) the chosen
slot, ``fallback`` (B,) bool or None, ``deadline_missed``, ``deadline_where``
and ``seconds`` per phase. ``scores`` of the Selection are the chosen
candidates' verifier scores, NaN where the verifier was skipped.
"""

from __future__ import annotations

import time

import torch

from ..core.errors import MmttsError
from ..core.registry import STRATEGIES
from ..core.settings import real, renamed, whole
from ..core.state import State
from ..core.strategy import SearchContext, Selection, Strategy
from ..modalities.vla.augment import Candidates, SampleSet
from ..modalities.vla.process import ActionProcess, NoValidActionError
from ..modalities.vla.select import Selector


@STRATEGIES.register("sample-verify")
class SampleVerify(Strategy):
    """Draw ``n`` actions per observation from the policy and let the verifier choose among the distinct ones.

    Args:
        n: candidates per observation, each a policy sample (old names ``num_samples``, ``samples``, ``k``).
        decimals: round before de-duplication (``None``: exact duplicates only).
        chunk: score at most this many candidates per verifier call (``None``: all at once); the deadline is
            checked between chunks.
        select: ``"argmax"``, or ``"softmax"`` to sample a candidate at ``temperature`` from the scores.
        temperature: the softmax temperature.
        deadline_s: seconds from the start of the search after which no more candidates are scored
            (``None``: only a ``Budget(max_seconds=...)`` limits the time).
    """

    def __init__(self, n: int | None = None, decimals: int | None = None, chunk: int | None = None,
                 select: str = "argmax", temperature: float = 1.0, deadline_s: float | None = None, *,
                 num_samples: int | None = None, samples: int | None = None, k: int | None = None):
        self._setup(renamed(self.name, "n", n, 16, num_samples=num_samples, samples=samples, k=k),
                    decimals, chunk, select, temperature, deadline_s)
        super().__init__(n=self.n, decimals=decimals, chunk=chunk, select=select, temperature=temperature,
                         deadline_s=deadline_s)

    def _setup(self, n, decimals, chunk, select, temperature, deadline_s) -> None:
        """Check and keep the settings both action strategies share."""
        self.n = whole("n", n, self.name)
        self.chunk = None if chunk is None else whole("chunk", chunk, self.name)
        if deadline_s is not None:
            deadline_s = real("deadline_s", deadline_s, self.name, low=0.0, low_open=True)
        decimals = whole("decimals", decimals, self.name, minimum=-300, none=True)
        self.decimals, self.selector, self.deadline_s = decimals, Selector(select, temperature), deadline_s

    def _late(self, ctx: SearchContext, t0: float) -> bool:
        return ctx.meter.out_of_time() or (self.deadline_s is not None and time.perf_counter() - t0 > self.deadline_s)

    @property
    def policy_samples(self) -> int:
        """N, the policy samples drawn per observation."""
        return self.n

    def candidates(self, ctx: SearchContext, state: State, samples: torch.Tensor,
                   valid: torch.Tensor | None) -> tuple[Candidates, torch.Tensor]:
        """The candidates of every observation (B, K, H, D) and, per slot, the sample candidate whose
        observation (and lineage) it carries (B, K) int64."""
        b, n = samples.shape[:2]
        source = torch.arange(0, b * n, b).repeat(b, 1).add_(torch.arange(b)[:, None])  # round r of row b: r*B+b
        return SampleSet(ctx.process.space, self.decimals)(samples, valid), source

    # -- the run ---------------------------------------------------------------------
    def run(self, ctx: SearchContext) -> Selection:
        process = ctx.process
        if not isinstance(process, ActionProcess):
            raise MmttsError(f"{self.name} searches robot actions: pass an ActionProcess (mmtts.modalities.vla), "
                             f"not {type(process).__name__}")
        t0 = time.perf_counter()
        b, n = process.rows, self.policy_samples
        ctx.require_candidates(b * n, 0)  # N policy samples for each of the B observations
        state = ctx.advance(ctx.fresh(b * n))
        flat = ctx.finish(state)  # (B*N, H, D), round-major
        samples = flat.view(n, b, *flat.shape[1:]).transpose(0, 1)  # (B, N, H, D), a view
        valid = process.valid(state)
        valid = None if bool(valid.all()) else valid.view(n, b).t()
        if valid is not None:
            empty = (~valid.any(1)).nonzero().flatten().tolist()
            if empty:
                raise NoValidActionError(
                    f"the policy returned only NaN/inf actions for observation(s) {empty} ({n} samples each); "
                    "check its inputs and weights, or draw more samples so that some are valid")
        step = _Step(samples, valid, {"propose": time.perf_counter() - t0})
        if n == 1 or self._late(ctx, t0):
            if n > 1:
                step.late("while sampling from the policy")
            return step.fallback_all(state)
        t1 = time.perf_counter()
        cands, source = self.candidates(ctx, state, samples, valid)
        step.seconds["augment"] = time.perf_counter() - t1
        step.cands = cands
        return self._verify(ctx, state, cands, source, step, t0)

    def _verify(self, ctx: SearchContext, state: State, cands: Candidates, source: torch.Tensor,
                step: "_Step", t0: float) -> Selection:
        """Score the candidates of observations with a choice to make, in one batch or in chunks, and choose."""
        t1 = time.perf_counter()
        k = cands.draws.shape[1]
        if cands.keep is None and k > 1:  # the usual case: K distinct candidates everywhere, scored as they lie
            todo, where = None, None
            flat, at = cands.draws.flatten(0, 1), source.flatten()
        else:
            keep = cands.mask
            todo = keep & (keep.sum(1) > 1)[:, None]  # the candidates of observations with a choice to make
            where = todo.nonzero()  # (M, 2): observation, slot; row-major, so each observation's in draw order
            if where.shape[0] == 0:  # every observation exits early: its one candidate is the first it kept
                index = keep.to(torch.int8).argmax(1)
                return step.choose(state, source, index, None, None)
            flat, at = cands.draws[where[:, 0], where[:, 1]], source[where[:, 0], where[:, 1]]
        scoring = state.select(at)
        total = flat.shape[0]
        chunk = self.chunk or total
        parts = []
        for start in range(0, total, chunk):
            if self._late(ctx, t0):
                step.late(f"with {start} of {total} candidates scored")
                break
            if chunk >= total:
                parts.append(ctx.score(flat, scoring))
            else:
                stop = min(start + chunk, total)
                parts.append(ctx.score(flat[start:stop], scoring.select(torch.arange(start, stop))))
        if not step.deadline_missed and self._late(ctx, t0):
            step.late("while verifying candidates")
        step.seconds["verify"] = time.perf_counter() - t1
        scored = torch.cat(parts) if len(parts) > 1 else parts[0] if parts else torch.empty(0, dtype=torch.float64)
        m, fallback, scored_mask = scored.shape[0], None, None
        if where is None and m == total:
            full = scored.view(cands.draws.shape[:2])
        else:
            if todo is None:
                todo = cands.mask
            # one (B, K) score matrix: -inf marks what is not a scored candidate; an observation that
            # exits early scores its single candidate 0, so the same argmax finds it
            if where is None:
                where = todo.nonzero()
            full = torch.zeros(todo.shape, dtype=torch.float64).masked_fill_(todo | ~cands.mask, float("-inf"))
            full[where[:m, 0], where[:m, 1]] = scored
            if m < total:  # the deadline came first: only a prefix of the candidates was scored
                done = torch.zeros_like(todo)
                done[where[:m, 0], where[:m, 1]] = True
                fallback = todo.any(1) & ~done.any(1)
                full[fallback, 0] = 0.0  # placeholder, replaced by the fallback action
                todo = done
            scored_mask = todo
        index = self.selector.select(full, ctx.rng.torch() if self.selector.mode == "softmax" else None)
        return step.choose(state, source, index, full, scored_mask, fallback)


class _Step:
    """What one search over a batch of observations found, and the Selection that reports it."""

    def __init__(self, samples: torch.Tensor, valid: torch.Tensor | None, seconds: dict):
        self.samples, self.valid, self.seconds = samples, valid, seconds
        self.cands: Candidates | None = None
        self.deadline_missed, self.where = False, ""

    def late(self, where: str) -> None:
        self.deadline_missed, self.where = True, where

    def first(self) -> torch.Tensor:
        """The position of each observation's first valid sample (B,)."""
        if self.valid is None:
            return torch.zeros(self.samples.shape[0], dtype=torch.int64)
        return self.valid.to(torch.int8).argmax(1)

    def extra(self, **fields) -> dict:
        cands = self.cands
        return {"samples": self.samples.shape[1], "candidates": 1 if cands is None else cands.draws.shape[1],
                "valid": self.valid, "keep": None if cands is None else cands.keep,
                "deadline_missed": self.deadline_missed, "deadline_where": self.where, "seconds": self.seconds,
                **fields}

    def fallback_all(self, state: State) -> Selection:
        """Each observation's first valid policy sample, untouched (n = 1, or no time left to verify)."""
        b = self.samples.shape[0]
        pos = self.first()
        chosen = self.samples[torch.arange(b), pos]
        fallback = torch.full((b,), self.deadline_missed)
        return Selection(outputs=chosen, scores=torch.full((b,), float("nan"), dtype=torch.float64),
                         state=state.select(pos * b + torch.arange(b)),
                         extra=self.extra(scores=None, scored=None, index=None, fallback=fallback))

    def choose(self, state: State, source: torch.Tensor, index: torch.Tensor, full: torch.Tensor | None,
               scored: torch.Tensor | None, fallback: torch.Tensor | None = None) -> Selection:
        draws = self.cands.draws
        b, k = draws.shape[:2]
        slot = index + torch.arange(0, b * k, k) if b > 1 else index
        chosen = draws.flatten(0, 1).index_select(0, slot)
        at = source.flatten().index_select(0, slot)
        if full is None:
            scores = torch.full((b,), float("nan"), dtype=torch.float64)
        else:
            scores = full.flatten().index_select(0, slot)
            if scored is not None:  # an early exit or a fallback has no verifier score
                scores = scores.masked_fill(~scored.flatten().index_select(0, slot), float("nan"))
        if fallback is not None:
            pos = self.first()
            chosen = torch.where(fallback[:, None, None], self.samples[torch.arange(b), pos], chosen)
            at = torch.where(fallback, pos * b + torch.arange(b), at)
        out_state = state.select(at).replace(action=chosen)
        return Selection(outputs=chosen, scores=scores, state=out_state,
                         extra=self.extra(scores=full, scored=scored, index=index, fallback=fallback))
