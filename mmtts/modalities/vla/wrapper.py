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
from dataclasses import dataclass, field
from typing import Callable

import torch

from ...core.errors import MmttsError
from ...core.rng import derive_seed
from ...core.verifier import FunctionVerifier, Verifier
from .augment import GaussianAugmenter, SampleSet
from .policy import SamplingPolicy, check_shapes, take_rows
from .proposer import Proposer
from .select import Selector
from .space import ActionSpace

DEADLINE_POLICIES = ("fallback", "error")


class DeadlineMissed(MmttsError):
    """A control step ran past its deadline and the wrapper was told to raise rather than fall back."""


@dataclass
class StepDiagnostics:
    """What one control step did, per observation, and how long each part took (seconds)."""

    step: int
    samples: int
    dropped: list[int]
    candidates: list[int]
    scores: list[torch.Tensor | None]
    chosen: list[int]
    early_exit: list[bool]
    fallback: list[bool]
    seconds: dict = field(default_factory=dict)
    deadline_missed: bool = False


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
        shapes = getattr(self.policy, "input_shapes", None)
        rows = check_shapes(batch, shapes or {})
        g = self._generator()
        props = self.proposer(batch, rows, g)
        fallback = props.first()
        seconds = {"propose": time.perf_counter() - t0}
        n = self.proposer.num_samples
        diag = StepDiagnostics(self.step, n, props.dropped, [1] * rows, [None] * rows, [0] * rows, [True] * rows,
                               [False] * rows, seconds)
        if n == 1 or self._late(t0):
            if n > 1:
                diag.deadline_missed, diag.fallback, diag.early_exit = True, [True] * rows, [False] * rows
                self._miss(t0, "while sampling from the policy")
            return self._finish(diag, fallback, t0)
        t1 = time.perf_counter()
        cands = self.augmenter(props.samples, g, props.valid)
        seconds["augment"] = time.perf_counter() - t1
        diag.candidates = cands.counts
        diag.early_exit = cands.early_exit
        chosen = torch.stack([a[0] for a in cands.actions])
        pending = [b for b in range(rows) if not diag.early_exit[b]]
        if pending:
            chosen = self._verify(batch, cands.actions, pending, chosen, fallback, diag, g, t0)
        return self._finish(diag, chosen, t0)

    def _verify(self, batch, actions, pending, chosen, fallback, diag, g, t0):
        t1 = time.perf_counter()
        counts = [actions[b].shape[0] for b in pending]
        flat = torch.cat([actions[b] for b in pending])
        owner = torch.repeat_interleave(torch.tensor(pending), torch.tensor(counts))
        chunk = self.verifier_chunk or flat.shape[0]
        parts = []
        for start in range(0, flat.shape[0], chunk):
            if self._late(t0):
                diag.deadline_missed = True
                self._miss(t0, f"with {start} of {flat.shape[0]} candidates scored")
                break
            stop = min(start + chunk, flat.shape[0])
            parts.append(self.verifier(flat[start:stop], take_rows(batch, owner[start:stop])))
        if not diag.deadline_missed and self._late(t0):
            diag.deadline_missed = True
            self._miss(t0, "while verifying candidates")
        diag.seconds["verify"] = time.perf_counter() - t1
        scored = torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64)
        chosen = chosen.clone()
        offset = 0
        for b, count in zip(pending, counts):
            s, offset = scored[offset:offset + count], offset + count
            if s.numel() == 0:  # the deadline came before any of its candidates was scored
                chosen[b], diag.fallback[b] = fallback[b], True
                continue
            k = self.selector(s, g)  # a partly scored observation chooses among its scored candidates
            diag.scores[b], diag.chosen[b] = s, k
            chosen[b] = actions[b][k]
        return chosen

    def _finish(self, diag: StepDiagnostics, chosen: torch.Tensor, t0: float) -> torch.Tensor:
        diag.seconds["total"] = time.perf_counter() - t0
        self.diagnostics.append(diag)
        self.step += 1
        return chosen
