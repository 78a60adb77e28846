"""RoboMonkeyPolicy: sample, perturb, vote, verify, as a drop-in LeRobot-style policy.

``select_action(batch) -> (B, action_dim)`` and ``reset()`` are all a control
loop calls, so the wrapper replaces a policy without touching the loop.

The loop lives here rather than as a strategy in ``mmtts.search``: it works
in the space of actions (bounds, discrete gripper dimensions, duplicates),
which a generic Process does not describe; it acts for a batch of B
observations per call, each with its own candidates, where strategies
search for one conditioning per run; and it must answer within a control
period, so it is anytime (a per-step deadline with the policy's first sample
as fallback) rather than budget-capped. The verifier is still a core
Verifier, so ``MeanRank`` ensembles and ``Cached`` apply unchanged.

Randomness: each control step draws from a generator seeded by
(seed, episode, step), so the same seed gives the same actions whatever else
runs, and ``reset()`` starts the next episode's streams.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

import torch

from ...core.errors import MmttsError
from ...core.rng import derive_seed
from ...core.verifier import FunctionVerifier, Verifier
from .augment import GaussianAugmenter, SampleSet
from .policy import SamplingPolicy, check_shapes, expand_rows, slice_rows, take_rows
from .proposer import Proposer
from .select import Selector
from .space import ActionSpace

DEADLINE_POLICIES = ("fallback", "error")


class DeadlineMissed(MmttsError):
    """A control step ran past its deadline and the wrapper was told to raise rather than fall back."""


class StepDiagnostics:
    """What one control step did, per observation, and how long each part took (seconds).

    The step keeps its tensors and builds the per-observation lists when they
    are read, so recording costs the control loop nothing.

    - ``dropped``: invalid (NaN/inf) policy samples per observation;
    - ``candidates``: distinct candidates per observation;
    - ``scores``: the verifier's scores of each observation's candidates, in
      candidate order (``None`` where nothing was scored);
    - ``chosen``: the index of the chosen candidate among them;
    - ``early_exit``: one distinct candidate, so the verifier was skipped;
    - ``fallback``: the deadline left nothing scored, so the first sample was used.
    """

    def __init__(self, step: int, samples: int, rows: int, proposals, seconds: dict):
        self.step, self.samples, self.rows, self.seconds = step, samples, rows, seconds
        self.deadline_missed = False
        self._proposals = proposals
        self._cands = None  # Candidates, once drawn
        self._scored = None  # (B, K) bool: the scored candidates (None: every distinct one, when scores exist)
        self._scores = None  # (B, K) float64, -inf where not scored
        self._index = None  # (B,) chosen slot
        self._fallback = None  # (B,) bool, or None for no fallback
        self._all_fallback = False

    @property
    def _keep(self) -> torch.Tensor | None:
        return None if self._cands is None else self._cands.mask

    @property
    def dropped(self) -> list[int]:
        return self._proposals.dropped

    @property
    def candidates(self) -> list[int]:
        return [1] * self.rows if self._cands is None else self._cands.counts

    @property
    def early_exit(self) -> list[bool]:
        if self._cands is None:
            return [not self._all_fallback] * self.rows
        return self._cands.early_exit

    @property
    def fallback(self) -> list[bool]:
        if self._fallback is None:
            return [self._all_fallback] * self.rows
        return self._fallback.tolist()

    def _scored_mask(self) -> torch.Tensor | None:
        if self._scores is None:
            return None
        return self._keep if self._scored is None else self._scored

    def _has_scores(self) -> list[bool]:
        scored = self._scored_mask()
        if scored is None:
            return [False] * self.rows
        has = scored.any(1)
        if self._fallback is not None:
            has &= ~self._fallback
        return has.tolist()

    @property
    def scores(self) -> list[torch.Tensor | None]:
        scored = self._scored_mask()
        return [self._scores[b][scored[b]] if has else None for b, has in enumerate(self._has_scores())]

    @property
    def chosen(self) -> list[int]:
        if self._index is None:
            return [0] * self.rows
        rank = (self._keep.cumsum(1) - 1).gather(1, self._index[:, None])[:, 0]
        if self._fallback is not None:
            rank = rank.masked_fill(self._fallback, 0)
        return rank.tolist()


class RoboMonkeyPolicy:
    """Wrap a sampling ``policy`` with Gaussian augmentation and an action ``verifier``.

    ``num_samples`` (N) policy samples per observation, ``num_candidates``
    (K) Gaussian candidates; with N = 1 there is nothing to fit and the
    policy's own sample is returned untouched. ``deadline_s`` caps the time
    of a step: candidates are scored in chunks of ``verifier_chunk`` and,
    once time is up, the best scored so far wins, or the policy's first
    sample if none was scored (``on_deadline="error"`` raises instead).
    """

    def __init__(self, policy: SamplingPolicy, verifier: Verifier | Callable, space: ActionSpace,
                 num_samples: int = 8, num_candidates: int = 16, selector: Selector | None = None,
                 deadline_s: float | None = None, on_deadline: str = "fallback", verifier_chunk: int | None = None,
                 dedupe_decimals: int | None = None, seed: int = 0, n_action_steps: int | None = None,
                 augmenter: GaussianAugmenter | SampleSet | None = None):
        if not isinstance(space, ActionSpace):
            raise MmttsError(f"space must be an ActionSpace (e.g. ActionSpace.from_gym(env.action_space)), "
                             f"not {type(space).__name__}")
        if isinstance(verifier, Verifier):
            self.verifier = verifier
        elif callable(verifier):
            self.verifier = FunctionVerifier(verifier, takes_context=True)
        else:
            raise MmttsError(f"verifier must be an mmtts Verifier or fn(actions, observations), not "
                             f"{type(verifier).__name__}")
        if deadline_s is not None and not deadline_s > 0:
            raise MmttsError(f"deadline_s={deadline_s} must be positive seconds, or None for no deadline")
        if on_deadline not in DEADLINE_POLICIES:
            raise MmttsError(f"on_deadline={on_deadline!r}; choose one of {DEADLINE_POLICIES}")
        if verifier_chunk is not None and verifier_chunk < 1:
            raise MmttsError(f"verifier_chunk={verifier_chunk} must be >= 1, or None to score all candidates at once")
        if n_action_steps is not None and n_action_steps < 1:
            raise MmttsError(f"n_action_steps={n_action_steps} must be >= 1, or None to use whole chunks")
        self.space = space
        self.proposer = Proposer(policy, num_samples, space)
        self.augmenter = augmenter or GaussianAugmenter(num_candidates, space, dedupe_decimals)
        self.selector = selector or Selector("argmax")
        self.deadline_s, self.on_deadline, self.verifier_chunk = deadline_s, on_deadline, verifier_chunk
        self.seed, self.n_action_steps = int(seed), n_action_steps
        self.episode, self.step, self._queue = 0, 0, deque()
        self.diagnostics: list[StepDiagnostics] = []

    @property
    def policy(self) -> SamplingPolicy:
        return self.proposer.policy

    def reset(self) -> None:
        """Start a new episode: empty the action queue and the diagnostics, move to the next random streams."""
        if self.step or self.diagnostics:
            self.episode += 1
        self.step = 0
        self._queue.clear()
        self.diagnostics = []

    def select_action(self, batch) -> torch.Tensor:
        """One action per observation, (B, action_dim); chunk policies are queued as LeRobot does."""
        if not self._queue:
            chunk = self.choose(batch)  # (B, H, D)
            steps = chunk.shape[1] if self.n_action_steps is None else min(self.n_action_steps, chunk.shape[1])
            self._queue.extend(chunk[:, i] for i in range(steps))
        return self._queue.popleft()

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, self.episode, self.step))

    def _late(self, t0: float) -> bool:
        return self.deadline_s is not None and time.perf_counter() - t0 > self.deadline_s

    def _miss(self, t0: float, where: str) -> None:
        if self.on_deadline == "error":
            raise DeadlineMissed(
                f"control step {self.step} took {1e3 * (time.perf_counter() - t0):.1f} ms, past its deadline of "
                f"{1e3 * self.deadline_s:.1f} ms, {where}; lower num_samples/num_candidates, raise deadline_s, or "
                "pass on_deadline='fallback' to act with the best action found in time")

    def choose(self, batch) -> torch.Tensor:
        """The chosen action chunk per observation, (B, H, D), recording a :class:`StepDiagnostics`."""
        t0 = time.perf_counter()
        rows = check_shapes(batch, getattr(self.policy, "input_shapes", None) or {})
        g = self._generator()
        props = self.proposer(batch, rows, g)
        seconds = {"propose": time.perf_counter() - t0}
        n = self.proposer.num_samples
        diag = StepDiagnostics(self.step, n, rows, props, seconds)
        if n == 1 or self._late(t0):
            if n > 1:
                diag.deadline_missed, diag._all_fallback = True, True
                self._miss(t0, "while sampling from the policy")
            return self._finish(diag, props.first(), t0)
        t1 = time.perf_counter()
        cands = self.augmenter(props.samples, g, props.mask)
        seconds["augment"] = time.perf_counter() - t1
        k = cands.draws.shape[1]
        diag._cands = cands
        if cands.keep is None and k > 1:  # the usual case: K distinct candidates everywhere, scored as they lie
            todo, where = None, None
        else:
            keep = cands.mask
            todo = keep & (keep.sum(1) > 1)[:, None]  # the candidates of observations with a choice to make
            where = todo.nonzero()  # (M, 2): observation, slot; row-major, so each observation's in draw order
            if where.shape[0] == 0:  # every observation exits early: its one candidate is the first it kept
                return self._finish(diag, self._take(cands.draws, keep.to(torch.int8).argmax(1)), t0)
        return self._finish(diag, self._verify(batch, cands, todo, where, props, diag, g, t0), t0)

    def _verify(self, batch, cands, todo, where, props, diag, g, t0):
        """Score the candidates marked ``todo`` (B, K) in one batch (or in chunks under a deadline) and choose."""
        t1 = time.perf_counter()
        if where is None:  # all of them: (B*K) rows in place, each observation repeated K times
            flat, context = cands.draws.flatten(0, 1), expand_rows(batch, cands.draws.shape[1])
        else:
            flat, context = cands.draws[where[:, 0], where[:, 1]], take_rows(batch, where[:, 0])
        total = flat.shape[0]
        chunk = self.verifier_chunk or total
        parts = []
        for start in range(0, total, chunk):
            if self._late(t0):
                diag.deadline_missed = True
                self._miss(t0, f"with {start} of {total} candidates scored")
                break
            if chunk == total:
                parts.append(self.verifier(flat, context))
            else:
                stop = min(start + chunk, total)
                parts.append(self.verifier(flat[start:stop], slice_rows(context, start, stop)))
        if not diag.deadline_missed and self._late(t0):
            diag.deadline_missed = True
            self._miss(t0, "while verifying candidates")
        diag.seconds["verify"] = time.perf_counter() - t1
        scored = torch.cat(parts) if len(parts) > 1 else parts[0] if parts else torch.empty(0, dtype=torch.float64)
        m, fallback = scored.shape[0], None
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
                full[fallback, 0] = 0.0  # placeholder, replaced by the fallback action below
                todo = done
            diag._scored = todo
        diag._scores = full
        diag._index = index = self.selector.select(full, g)
        chosen = self._take(cands.draws, index)
        if fallback is not None:
            diag._fallback = fallback
            chosen = torch.where(fallback[:, None, None], props.first(), chosen)
        return chosen

    @staticmethod
    def _take(draws: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``draws[b, index[b]]`` for every observation: (B, K, H, D) -> (B, H, D)."""
        b, k = draws.shape[:2]
        if b > 1:
            index = index + torch.arange(0, b * k, k, device=index.device)
        return draws.flatten(0, 1).index_select(0, index)

    def _finish(self, diag: StepDiagnostics, chosen: torch.Tensor, t0: float) -> torch.Tensor:
        diag.seconds["total"] = time.perf_counter() - t0
        self.diagnostics.append(diag)
        self.step += 1
        return chosen
