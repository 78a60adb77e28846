"""Capping the compute a search spends (:class:`Budget`) and counting it (:class:`Meter`).

The unit of model compute is the NFE: one forward of the model for one
candidate. A process declares what one stage costs per candidate (a
classifier-free-guided diffusion step is 2, a VAR scale may cost its token
count), so budgets compare across strategies and modalities honestly.
Verifier evaluations and decodes are counted separately, and wall time is split
into model, verifier and decode time, with the rest reported as overhead.

A :class:`Budget` holds only the caps and never changes, so one object can be
reused for any number of searches; each search's :class:`SearchContext
<mmtts.core.strategy.SearchContext>` owns a fresh :class:`Meter` that counts
what that search spent against it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from .errors import BudgetError, BudgetExceeded

_TIMERS = ("model", "verifier", "decode")


@dataclass(frozen=True)
class Budget:
    """The caps of a search: an immutable spec, safe to reuse across searches.

    Args:
        max_nfe: cap on model forwards, summed over candidates (a whole number > 0).
        max_verifier_calls: cap on candidate evaluations by the search verifier (a whole number > 0).
        max_seconds: wall-clock limit of the search (a finite number > 0). At the deadline the search stops
            before its next model step and returns the best candidate finished so far, with
            ``Result.stopped == "deadline"`` (see :func:`~mmtts.core.strategy.run_strategy`).

    ``None`` leaves that resource uncapped; at least one cap is needed.
    """

    max_nfe: int | None = None
    max_verifier_calls: int | None = None
    max_seconds: float | None = None

    def __post_init__(self):
        for name in ("max_nfe", "max_verifier_calls"):
            v = getattr(self, name)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                        or not float(v).is_integer():
                    raise BudgetError(f"{name}={v!r} must be a whole number of calls; pass None for no cap")
                if v <= 0:
                    raise BudgetError(f"{name}={v} must be positive; pass None for no cap")
                object.__setattr__(self, name, int(v))
        s = self.max_seconds
        if s is not None:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
                raise BudgetError(f"max_seconds={s!r} must be a finite number of seconds > 0; "
                                  "pass None for no time limit")
            object.__setattr__(self, "max_seconds", float(s))
        if self.max_nfe is None and self.max_verifier_calls is None and self.max_seconds is None:
            raise BudgetError("a budget needs at least one cap: max_nfe, max_verifier_calls or max_seconds")

    @classmethod
    def coerce(cls, budget: "Budget | int") -> "Budget":
        """Accept a Budget (returned as is: it never changes) or a plain NFE count."""
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, (int, float)) and not isinstance(budget, bool):
            return cls(max_nfe=budget)
        raise BudgetError(f"budget must be a Budget or a number of model forwards, not {type(budget).__name__}")

    def caps(self) -> tuple:
        return (self.max_nfe, self.max_verifier_calls, self.max_seconds)


class Meter:
    """What one search has spent against its :class:`Budget`: counters, the wall clock and the deadline.

    Args:
        budget: the caps this meter enforces.
    """

    def __init__(self, budget: Budget):
        self.budget = budget
        self.nfe = 0
        self.verifier_calls = 0
        self.decodes = 0
        self.seconds = {k: 0.0 for k in _TIMERS}
        self.elapsed_before = 0.0  # wall time of earlier sessions of a resumed run
        #: why the search stopped before its strategy finished: "deadline", or None
        self.stopped: str | None = None
        self._t0: float | None = None

    # -- starting and timing -------------------------------------------------
    def start(self) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    @property
    def elapsed(self) -> float:
        live = 0.0 if self._t0 is None else time.perf_counter() - self._t0
        return self.elapsed_before + live

    def timer(self, kind: str) -> "_Timer":
        """``with meter.timer(kind):`` adds the block's wall time to ``seconds[kind]``."""
        if kind not in self.seconds:
            raise ValueError(f"unknown timer {kind!r}; one of {_TIMERS}")
        return _Timer(self.seconds, kind)

    # -- what is left ----------------------------------------------------------
    @property
    def remaining_nfe(self) -> float:
        cap = self.budget.max_nfe
        return float("inf") if cap is None else cap - self.nfe

    @property
    def remaining_verifier_calls(self) -> float:
        cap = self.budget.max_verifier_calls
        return float("inf") if cap is None else cap - self.verifier_calls

    @property
    def counted(self) -> bool:
        """Whether a count cap (NFE or verifier calls) bounds the search, not only the clock."""
        return self.budget.max_nfe is not None or self.budget.max_verifier_calls is not None

    def can_afford(self, nfe: int = 0, verifier_calls: int = 0) -> bool:
        return nfe <= self.remaining_nfe and verifier_calls <= self.remaining_verifier_calls

    def out_of_time(self) -> bool:
        return self.budget.max_seconds is not None and self.elapsed >= self.budget.max_seconds

    def check_affordable(self, what: str, nfe: int = 0, verifier_calls: int = 0) -> None:
        if not self.can_afford(nfe, verifier_calls):
            raise BudgetExceeded(
                f"{what} needs {nfe} NFE and {verifier_calls} verifier calls but only "
                f"{self.remaining_nfe} NFE and {self.remaining_verifier_calls} verifier calls remain; "
                "strategies must size their schedules from the budget"
            )

    def capacity(self, nfe_per_candidate: int, verifier_calls_per_candidate: int = 1) -> int:
        """How many complete candidates (each with its verifier calls) the caps allow; -1 when only time caps."""
        if nfe_per_candidate <= 0:
            raise BudgetError(f"a candidate must cost at least one NFE, not {nfe_per_candidate}")
        limits = [self.remaining_nfe / nfe_per_candidate]
        if verifier_calls_per_candidate > 0:
            limits.append(self.remaining_verifier_calls / verifier_calls_per_candidate)
        n = min(limits)
        return int(n) if n != float("inf") else -1

    def require_candidates(self, n: int, nfe_per_candidate: int, verifier_calls_per_candidate: int = 1) -> None:
        """Raise a clear error when the budget cannot pay for ``n`` complete candidates."""
        cap = self.capacity(nfe_per_candidate, verifier_calls_per_candidate)
        if cap != -1 and cap < n:
            b = self.budget
            raise BudgetError(
                f"the budget ({b.max_nfe} NFE, {b.max_verifier_calls} verifier calls) pays for {cap} "
                f"candidate(s) but the strategy needs at least {n}; one candidate costs {nfe_per_candidate} NFE "
                f"and {verifier_calls_per_candidate} verifier call(s): raise the budget to at least "
                f"{n * nfe_per_candidate} NFE"
            )

    # -- charging ----------------------------------------------------------------
    def charge(self, nfe: int = 0, verifier_calls: int = 0, decodes: int = 0) -> None:
        self.nfe += int(nfe)
        self.verifier_calls += int(verifier_calls)
        self.decodes += int(decodes)

    def report(self) -> dict:
        """Counters, caps, what stopped the search early (``stopped``: "deadline" or None), and the wall-time split
        (overhead = wall - model - verifier - decode)."""
        wall = self.elapsed
        spent = sum(self.seconds.values())
        b = self.budget
        return {
            "nfe": self.nfe,
            "max_nfe": b.max_nfe,
            "verifier_calls": self.verifier_calls,
            "max_verifier_calls": b.max_verifier_calls,
            "decodes": self.decodes,
            "max_seconds": b.max_seconds,
            "stopped": self.stopped,
            "seconds": {**{k: round(v, 6) for k, v in self.seconds.items()},
                        "overhead": round(max(wall - spent, 0.0), 6), "wall": round(wall, 6)},
        }

    # -- checkpoints ---------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"nfe": self.nfe, "verifier_calls": self.verifier_calls, "decodes": self.decodes,
                "seconds": dict(self.seconds), "elapsed_before": self.elapsed, "stopped": self.stopped}

    def load_state_dict(self, d: dict) -> None:
        """Continue from a checkpoint's counters and elapsed time (the clock restarts now)."""
        self.nfe, self.verifier_calls, self.decodes = int(d["nfe"]), int(d["verifier_calls"]), int(d["decodes"])
        self.seconds = {k: float(d["seconds"][k]) for k in _TIMERS}
        self.elapsed_before = float(d["elapsed_before"])
        self.stopped = d.get("stopped")
        self._t0 = time.perf_counter()


class _Timer:
    """The context manager of :meth:`Meter.timer` (a plain class: it sits on every model, decode and verifier call)."""

    __slots__ = ("seconds", "kind", "t")

    def __init__(self, seconds: dict, kind: str):
        self.seconds, self.kind = seconds, kind

    def __enter__(self) -> None:
        self.t = time.perf_counter()

    def __exit__(self, *exc) -> bool:
        self.seconds[self.kind] += time.perf_counter() - self.t
        return False
