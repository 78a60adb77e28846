"""RoboMonkeyPolicy: sample, perturb, vote, verify, as a drop-in LeRobot-style policy.

``select_action(batch) -> (B, action_dim)`` and ``reset()`` are all a control
loop calls, so the wrapper replaces a policy without touching the loop.

It is a thin loop over the core: every control step is one search of an
:class:`~mmtts.modalities.vla.process.ActionProcess` over the step's
observations with the ``robomonkey`` (or ``sample-verify``) strategy, the
same search ``mmtts.search(process, verifier, "robomonkey", ...)`` runs. The
budget pays for the step's policy samples; a per-step deadline is the
strategy's ``deadline_s``: the policy always samples, and the strategy falls
back to the policy's first sample where time ran out before anything was
scored.

Randomness: the search of a control step is seeded by (seed, episode, step),
so the same seed gives the same actions whatever else runs, and ``reset()``
starts the next episode's streams.
"""

from __future__ import annotations

import numbers
import time
from collections import deque
from typing import Callable

import torch

from ...core.budget import Budget
from ...core.errors import MmttsError, call_user
from ...core.rng import derive_seed
from ...core.settings import whole
from ...core.strategy import run_strategy
from ...core.verifier import FunctionVerifier, Verifier
from .policy import SamplingPolicy
from .process import ActionProcess
from .select import Selector
from .space import ActionSpace

DEADLINE_POLICIES = ("fallback", "error")
STRATEGY_NAMES = ("robomonkey", "sample-verify")


class DeadlineMissed(MmttsError):
    """A control step ran past its deadline and the wrapper was told to raise rather than fall back."""


class StepDiagnostics:
    """What one control step did, per observation, and how long each part took (seconds).

    It reads the tensors the strategy left in its result and builds the
    per-observation lists when they are read, so recording costs the
    control loop nothing.

    - ``dropped``: invalid (NaN/inf) policy samples per observation;
    - ``candidates``: distinct candidates per observation;
    - ``scores``: the verifier's scores of each observation's candidates, in
      candidate order (``None`` where nothing was scored);
    - ``chosen``: the index of the chosen candidate among them;
    - ``early_exit``: one distinct candidate, so the verifier was skipped;
    - ``fallback``: the deadline left nothing scored, so the first sample was used.

    Args:
        step: the control step's index in its episode.
        rows: the number of observations B.
        extra: the ``extra`` of the step's search result (see :mod:`mmtts.strategies.sample_verify`).
        seconds: the time of each phase (``propose``, ``augment``, ``verify``, ``total``).
    """

    def __init__(self, step: int, rows: int, extra: dict, seconds: dict):
        self.step, self.rows, self.seconds, self._x = step, rows, seconds, extra
        self.samples = extra["samples"]
        self.deadline_missed = extra["deadline_missed"]

    @property
    def dropped(self) -> list[int]:
        valid = self._x["valid"]
        return [0] * self.rows if valid is None else (~valid).sum(1).tolist()

    @property
    def candidates(self) -> list[int]:
        keep = self._x["keep"]
        return [self._x["candidates"]] * self.rows if keep is None else keep.sum(1).tolist()

    @property
    def early_exit(self) -> list[bool]:
        keep, k = self._x["keep"], self._x["candidates"]
        if keep is None:
            return [k == 1 and not self.deadline_missed] * self.rows
        return (keep.sum(1) == 1).tolist()

    def _keep(self) -> torch.Tensor:
        keep = self._x["keep"]
        return keep if keep is not None else torch.ones(self.rows, self._x["candidates"], dtype=torch.bool)

    @property
    def fallback(self) -> list[bool]:
        fb = self._x["fallback"]
        return [False] * self.rows if fb is None else fb.tolist()

    def _scored_mask(self) -> torch.Tensor | None:
        if self._x["scores"] is None:
            return None
        return self._keep() if self._x["scored"] is None else self._x["scored"]

    @property
    def scores(self) -> list[torch.Tensor | None]:
        scored = self._scored_mask()
        if scored is None:
            return [None] * self.rows
        has = scored.any(1)
        if self._x["fallback"] is not None:
            has &= ~self._x["fallback"]
        full = self._x["scores"]
        return [full[b][scored[b]] if h else None for b, h in enumerate(has.tolist())]

    @property
    def chosen(self) -> list[int]:
        index = self._x["index"]
        if index is None:
            return [0] * self.rows
        rank = (self._keep().cumsum(1) - 1).gather(1, index[:, None])[:, 0]
        if self._x["fallback"] is not None:
            rank = rank.masked_fill(self._x["fallback"], 0)
        return rank.tolist()


class RoboMonkeyPolicy:
    """Wrap a sampling ``policy`` with Gaussian augmentation and an action ``verifier``, LeRobot-shaped.

    Args:
        policy: a sampling policy (``GaussianPolicy``, ``NoisePolicy``, ``TokenActionPolicy``).
        verifier: an mmtts ``Verifier`` of actions, or ``fn(actions, observations) -> scores``.
        space: the action space (bounds, discrete dimensions).
        n: K, the candidates per observation (old name ``num_candidates``).
        policy_samples: N, the policy samples per observation (old name ``num_samples``); default 8 for
            ``robomonkey``, ``n`` for ``sample-verify`` (where every candidate is a policy sample). With N = 1
            the policy's own sample is returned untouched.
        strategy: ``"robomonkey"`` (Gaussian augmentation) or ``"sample-verify"`` (the samples themselves).
        selector: how to choose from the scores (default ``Selector("argmax")``).
        deadline_s: the time of a step: candidates are scored in chunks of ``verifier_chunk`` and, once time is
            up, the best scored so far wins, or the policy's first sample if none was scored.
        on_deadline: ``"fallback"`` (act anyway) or ``"error"`` (raise :class:`DeadlineMissed`).
        verifier_chunk: candidates per verifier call (``None``: all at once).
        dedupe_decimals: round before de-duplication (``None``: exact duplicates only).
        seed: the root of every step's random streams.
        n_action_steps: how many actions of each chosen chunk to execute (``None``: the whole chunk).
    """

    def __init__(self, policy: SamplingPolicy, verifier: Verifier | Callable, space: ActionSpace,
                 n: int | None = None, policy_samples: int | None = None, strategy: str = "robomonkey",
                 selector: Selector | None = None, deadline_s: float | None = None, on_deadline: str = "fallback",
                 verifier_chunk: int | None = None, dedupe_decimals: int | None = None, seed: int = 0,
                 n_action_steps: int | None = None, *, num_samples: int | None = None,
                 num_candidates: int | None = None):
        from ...strategies.robomonkey import RoboMonkey
        from ...core.settings import renamed
        from ...strategies.sample_verify import SampleVerify

        if not isinstance(space, ActionSpace):
            raise MmttsError(f"space must be an ActionSpace (e.g. ActionSpace.from_gym(env.action_space)), "
                             f"not {type(space).__name__}")
        if not (hasattr(policy, "draw_noise") and hasattr(policy, "actions_from_noise")):
            raise MmttsError(f"{type(policy).__name__} cannot sample: wrap it in GaussianPolicy, NoisePolicy or "
                             "TokenActionPolicy, or give it draw_noise(streams, space) and "
                             "actions_from_noise(batch, noise)")
        if isinstance(verifier, Verifier):
            self.verifier = verifier
        elif callable(verifier):
            self.verifier = FunctionVerifier(_named_errors(verifier), takes_context=True,
                                             name=getattr(verifier, "__name__", "verifier"))
        else:
            raise MmttsError(f"verifier must be an mmtts Verifier or fn(actions, observations), not "
                             f"{type(verifier).__name__}")
        if on_deadline not in DEADLINE_POLICIES:
            raise MmttsError(f"on_deadline={on_deadline!r}; choose one of {DEADLINE_POLICIES}")
        n_action_steps = whole("n_action_steps", n_action_steps, "RoboMonkeyPolicy", none=True)
        if deadline_s is not None and (isinstance(deadline_s, bool) or not isinstance(deadline_s, numbers.Real)
                                       or not deadline_s > 0):
            raise MmttsError(f"deadline_s={deadline_s!r} must be positive seconds, or None for no deadline")
        if dedupe_decimals is not None:
            dedupe_decimals = whole("dedupe_decimals", dedupe_decimals, "RoboMonkeyPolicy", minimum=-300)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 63:
            raise MmttsError(f"seed={seed!r} must be a whole number in [0, 2**63), the root of every step's streams; "
                             "pass e.g. seed=0")
        n = renamed("RoboMonkeyPolicy", "n", n, 16, num_candidates=num_candidates)
        policy_samples = renamed("RoboMonkeyPolicy", "policy_samples", policy_samples, None, num_samples=num_samples)
        selector = selector or Selector("argmax")
        common = {"decimals": dedupe_decimals, "chunk": verifier_chunk, "select": selector.mode,
                  "temperature": selector.temperature, "deadline_s": deadline_s}
        if strategy == "robomonkey":
            self.strategy = RoboMonkey(n=n, policy_samples=8 if policy_samples is None else policy_samples, **common)
        elif strategy == "sample-verify":
            if policy_samples is not None and policy_samples != n:
                raise MmttsError(f"sample-verify verifies the policy samples themselves: policy_samples="
                                 f"{policy_samples} must equal n={n} (or be left out)")
            self.strategy = SampleVerify(n=n, **common)
        else:
            raise MmttsError(f"strategy={strategy!r}; choose one of {STRATEGY_NAMES}")
        self.policy, self.space = policy, space
        self.deadline_s, self.on_deadline = deadline_s, on_deadline
        self.seed, self.n_action_steps = int(seed), n_action_steps
        self.episode, self.step, self._queue = 0, 0, deque()
        self.diagnostics: list[StepDiagnostics] = []
        self._process: ActionProcess | None = None  # the first step's process; later steps take new observations
        self._budgets: dict[int, Budget] = {}

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

    def choose(self, batch) -> torch.Tensor:
        """The chosen action chunk per observation, (B, H, D), recording a :class:`StepDiagnostics`."""
        t0 = time.perf_counter()
        if self._process is None:
            self._process = process = ActionProcess(self.policy, batch, self.space)
        else:
            process = self._process.with_observations(batch)
        budget = self._budgets.get(process.rows)
        if budget is None:  # a Budget is an immutable spec: one per batch size serves every step
            budget = self._budgets[process.rows] = Budget(max_nfe=process.rows * self.strategy.policy_samples)
        result = run_strategy(self.strategy, process, self.verifier, budget,
                              seed=derive_seed(self.seed, self.episode, self.step))
        extra = result.extra
        seconds = dict(extra["seconds"])
        seconds["total"] = time.perf_counter() - t0
        self.diagnostics.append(StepDiagnostics(self.step, process.rows, extra, seconds))
        if extra["deadline_missed"] and self.on_deadline == "error":
            raise DeadlineMissed(
                f"control step {self.step} took {1e3 * seconds['total']:.1f} ms, past its deadline of "
                f"{1e3 * self.deadline_s:.1f} ms, {extra['deadline_where']}; lower n/policy_samples, raise "
                "deadline_s, or pass on_deadline='fallback' to act with the best action found in time")
        self.step += 1
        return result.outputs


def _named_errors(fn: Callable) -> Callable:
    """``fn(actions, observations)``, with an exception it raises turned into an MmttsError naming the verifier."""
    def score(actions, observations):
        return call_user(fn, actions, observations, explain=lambda e: (
            f"the verifier function raised {type(e).__name__}: {e}; it is called as fn(actions (M, H, D), "
            "observations with one row per action) and returns M scores"))
    return score
