"""Counting the compute a search spends, and capping it.

The unit of model compute is the NFE: one forward of the model for one
candidate. A process declares what one stage costs per candidate (a
classifier-free-guided diffusion step is 2, a VAR scale may cost its token
count), so budgets compare across strategies and modalities honestly.
Verifier evaluations and decodes are counted separately, and wall time is split
into model, verifier and decode time, with the rest reported as overhead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .errors import BudgetError, BudgetExceeded

_TIMERS = ("model", "verifier", "decode")


@dataclass
class Budget:
    """Caps and counters for one search run.

    ``max_nfe`` caps model forwards (summed over candidates);
    ``max_verifier_calls`` caps candidate evaluations by the search verifier;
    ``max_seconds`` is a soft wall-clock limit that anytime strategies check
    between stages. ``None`` leaves that resource uncapped.
    """

    max_nfe: int | None = None
    max_verifier_calls: int | None = None
    max_seconds: float | None = None
    nfe: int = 0
    verifier_calls: int = 0
    decodes: int = 0
    seconds: dict = field(default_factory=lambda: {k: 0.0 for k in _TIMERS})
    elapsed_before: float = 0.0
    _t0: float | None = field(default=None, repr=False)

    def __post_init__(self):
        for name in ("max_nfe", "max_verifier_calls"):
            v = getattr(self, name)
            if v is not None:
                if isinstance(v, bool) or not float(v).is_integer():
                    raise BudgetError(f"{name}={v!r} must be a whole number of calls")
                if v <= 0:
                    raise BudgetError(f"{name}={v} must be positive; pass None for no cap")
                setattr(self, name, int(v))
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise BudgetError(f"max_seconds={self.max_seconds} must be positive; pass None for no time limit")
        if self.max_nfe is None and self.max_verifier_calls is None and self.max_seconds is None:
            raise BudgetError("a budget needs at least one cap: max_nfe, max_verifier_calls or max_seconds")

    @classmethod
    def coerce(cls, budget: "Budget | int") -> "Budget":
        """Accept a Budget or a plain NFE count."""
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, (int, float)) and not isinstance(budget, bool):
            return cls(max_nfe=budget)
        raise BudgetError(f"budget must be a Budget or a number of model forwards, not {type(budget).__name__}")

    # -- starting and timing -------------------------------------------------
    def start(self) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    @property
    def elapsed(self) -> float:
        live = 0.0 if self._t0 is None else time.perf_counter() - self._t0
        return self.elapsed_before + live

    def timer(self, kind: str) -> "_Timer":
        """``with budget.timer(kind):`` adds the block's wall time to ``seconds[kind]``."""
        if kind not in self.seconds:
            raise ValueError(f"unknown timer {kind!r}; one of {_TIMERS}")
        return _Timer(self.seconds, kind)

    # -- what is left ----------------------------------------------------------
    @property
    def remaining_nfe(self) -> float:
        return float("inf") if self.max_nfe is None else self.max_nfe - self.nfe

    @property
    def remaining_verifier_calls(self) -> float:
        return float("inf") if self.max_verifier_calls is None else self.max_verifier_calls - self.verifier_calls

    def can_afford(self, nfe: int = 0, verifier_calls: int = 0) -> bool:
        return nfe <= self.remaining_nfe and verifier_calls <= self.remaining_verifier_calls

    def out_of_time(self) -> bool:
        return self.max_seconds is not None and self.elapsed >= self.max_seconds

    def check_affordable(self, what: str, nfe: int = 0, verifier_calls: int = 0) -> None:
        if not self.can_afford(nfe, verifier_calls):
            raise BudgetExceeded(
                f"{what} needs {nfe} NFE and {verifier_calls} verifier calls but only "
                f"{self.remaining_nfe} NFE and {self.remaining_verifier_calls} verifier calls remain; "
                "strategies must size their schedules from the budget"
            )

    def capacity(self, nfe_per_candidate: int, verifier_calls_per_candidate: int = 1) -> int:
        """How many complete candidates (each with its verifier calls) the caps allow."""
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
            raise BudgetError(
                f"the budget ({self.max_nfe} NFE, {self.max_verifier_calls} verifier calls) pays for {cap} "
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
        """Counters, caps and the wall-time split (overhead = wall - model - verifier - decode)."""
        wall = self.elapsed
        spent = sum(self.seconds.values())
        return {
            "nfe": self.nfe,
            "max_nfe": self.max_nfe,
            "verifier_calls": self.verifier_calls,
            "max_verifier_calls": self.max_verifier_calls,
            "decodes": self.decodes,
            "seconds": {**{k: round(v, 6) for k, v in self.seconds.items()},
                        "overhead": round(max(wall - spent, 0.0), 6), "wall": round(wall, 6)},
        }

    def state_dict(self) -> dict:
        return {
            "max_nfe": self.max_nfe, "max_verifier_calls": self.max_verifier_calls, "max_seconds": self.max_seconds,
            "nfe": self.nfe, "verifier_calls": self.verifier_calls, "decodes": self.decodes,
            "seconds": dict(self.seconds), "elapsed_before": self.elapsed,
        }

    @classmethod
    def from_state_dict(cls, d: dict) -> "Budget":
        return cls(**d)

    def caps(self) -> tuple:
        return (self.max_nfe, self.max_verifier_calls, self.max_seconds)


class _Timer:
    """The context manager of :meth:`Budget.timer` (a plain class: it sits on every model, decode and verifier call)."""

    __slots__ = ("seconds", "kind", "t")

    def __init__(self, seconds: dict, kind: str):
        self.seconds, self.kind = seconds, kind

    def __enter__(self) -> None:
        self.t = time.perf_counter()

    def __exit__(self, *exc) -> bool:
        self.seconds[self.kind] += time.perf_counter() - self.t
        return False
