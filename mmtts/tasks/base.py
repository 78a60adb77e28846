"""The Task interface: an offline benchmark with its data, reference models and metrics."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from ..core.errors import MmttsError
from .cache import ModelCache


class Task(ABC):
    """One benchmark. ``run(method, budget, seed)`` returns the metrics of one paired run.

    ``methods`` are compared at equal ``budget`` (in ``budget_unit``) against
    ``baseline`` on ``primary_metric``, within each of the task's experimental
    ``settings`` (e.g. "continual/bs64"). A task without a budget sweep sets
    ``budget_unit = None`` and receives ``budget=None``.

    Args:
        cache: where trained weights are kept; a default :class:`ModelCache` when None.
        quick: run a reduced version (fewer data, models and budgets) for a fast check.
        **options: task-specific knobs (strings from the CLI's ``--option key=value``),
            declared with their defaults in ``option_defaults``; unknown names are refused.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    methods: ClassVar[tuple[str, ...]] = ()
    baseline: ClassVar[str] = ""
    primary_metric: ClassVar[str] = "reward"
    higher_is_better: ClassVar[bool] = True
    budget_unit: ClassVar[str | None] = "NFE"
    settings: ClassVar[tuple[str, ...]] = ("default",)
    quick_settings: ClassVar[tuple[str, ...] | None] = None
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
    def run(self, method: str, setting: str, budget: int | None, seed: int) -> dict[str, float]:
        """Metrics of ``method`` in ``setting`` at ``budget`` for ``seed`` (the same seed means the same data)."""

    def detail(self, method: str, setting: str, budget: int | None) -> str:
        """A short description of the method's own settings here (for the results table)."""
        return ""

    def check_setting(self, setting: str) -> None:
        if setting not in self.settings:
            raise MmttsError(f"task {self.name!r} has no setting {setting!r}; its settings are: {', '.join(self.settings)}")

    def summarize(self, results: dict) -> dict:
        """Task-specific conclusions drawn from the rows (ratios, fits), stored under ``summary``; none by default."""
        return {}

    def extra_plots(self, results: dict, out) -> list:
        """Task-specific figures written into ``out`` beside ``<task>.png`` (a fitted scaling law); none by default."""
        return []

    def references(self, budgets: list[int]) -> dict[str, list[float]]:
        """Analytic or reference values of the primary metric per budget, drawn as lines (budget sweeps only)."""
        return {}

    def describe(self) -> dict:
        return {"name": self.name, "description": self.description, "options": self.options, "quick": self.quick}
