"""The Task interface: an offline benchmark with its data, reference models and metrics."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from ..core.errors import MmttsError
from .cache import ModelCache


class Task(ABC):
    """One benchmark. ``run(method, budget, seed)`` returns the metrics of one paired run.

    ``methods`` are compared at equal ``budget`` (in ``budget_unit``) against
    ``baseline`` on ``primary_metric``. ``options`` are task-specific settings
    (strings from the CLI's ``--option key=value``), declared in ``option_defaults``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    methods: ClassVar[tuple[str, ...]] = ()
    baseline: ClassVar[str] = ""
    primary_metric: ClassVar[str] = "reward"
    higher_is_better: ClassVar[bool] = True
    budget_unit: ClassVar[str] = "NFE"
    default_budgets: ClassVar[tuple[int, ...]] = ()
    quick_budgets: ClassVar[tuple[int, ...]] = ()
    default_seeds: ClassVar[tuple[int, ...]] = (0, 1, 2)
    option_defaults: ClassVar[dict] = {}

    def __init__(self, cache: ModelCache | None = None, quick: bool = False, **options):
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            valid = ", ".join(f"{k}={v}" for k, v in self.option_defaults.items()) or "(none)"
            raise MmttsError(f"task {self.name!r} has no option(s) {unknown}; its options are: {valid}")
        self.cache = cache or ModelCache()
        self.quick = quick
        self.options = {k: type(v)(options[k]) if k in options and v is not None else options.get(k, v)
                        for k, v in self.option_defaults.items()}

    def check_method(self, method: str) -> None:
        if method not in self.methods:
            raise MmttsError(f"task {self.name!r} has no method {method!r}; its methods are: {', '.join(self.methods)}")

    def prepare(self) -> list[str]:
        """Train and cache whatever reference models the task needs; returns what is ready."""
        return []

    @abstractmethod
    def run(self, method: str, budget: int, seed: int) -> dict[str, float]:
        """Metrics of ``method`` at ``budget`` for ``seed`` (the same seed means the same data)."""

    def setting(self, method: str, budget: int) -> str:
        """A short description of the method's settings at this budget (for the results table)."""
        return ""

    def references(self, budgets: list[int]) -> dict[str, list[float]]:
        """Analytic or reference values of the primary metric per budget, drawn as lines."""
        return {}

    def describe(self) -> dict:
        return {"name": self.name, "description": self.description, "options": self.options, "quick": self.quick}
