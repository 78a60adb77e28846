"""mmtts: multimodal test-time scaling and adaptation.

    result = mmtts.search(process, verifier, "particle-filter", budget=640, seed=0)
    adapter = mmtts.adapt(model, "bn")

``import mmtts`` itself imports nothing heavy: the core (and torch with it) is
loaded when one of its names (``mmtts.Budget``, ``mmtts.search``, ...) is first
used; every strategy, adapter, task and verifier module the first time its name
is used; and the subpackages (``mmtts.strategies``, ``mmtts.adapters``,
``mmtts.tasks``, ``mmtts.verifiers``, ``mmtts.modalities``, ``mmtts.kernels``)
when first reached.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

if TYPE_CHECKING:
    from .core import Adapter, Budget, Process, Result, Strategy, Verifier

__version__ = "0.1.0"

_CORE_NAMES = ("Adapter", "Budget", "BudgetError", "Cached", "MeanRank", "MmttsError", "Process", "Result", "State",
               "Strategy", "Verifier")
_SUBPACKAGES = ("adapters", "bench", "cli", "core", "kernels", "modalities", "strategies", "tasks", "verifiers")


def __getattr__(name: str):
    if name in _CORE_NAMES:
        return getattr(importlib.import_module(".core", __name__), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mmtts' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_CORE_NAMES) | set(_SUBPACKAGES))


def _registry(kind: str):
    from .core import registry
    return getattr(registry, kind)


def list_strategies() -> list[str]:
    return _registry("STRATEGIES").names()


def list_adapters() -> list[str]:
    return _registry("ADAPTERS").names()


def list_tasks() -> list[str]:
    return _registry("TASKS").names()


def list_verifiers() -> list[str]:
    return _registry("VERIFIERS").names()


def create_strategy(name: str, /, **settings) -> Strategy:
    return _registry("STRATEGIES").create(name, **settings)


def create_verifier(name: str, /, **settings) -> "Verifier":
    """A registered verifier by name (``mmtts.list_verifiers()``), built with ``settings``."""
    return _registry("VERIFIERS").create(name, **settings)


def create_task(name: str, /, **settings):
    return _registry("TASKS").create(name, **settings)


def adapt(model, /, method: str = "tent", **overrides) -> Adapter:
    """Wrap a classifier in a test-time adaptation method: ``logits = adapter(x)``; ``adapter.reset()``."""
    return _registry("ADAPTERS").create(method, model, **overrides)


def search(process: Process, verifier: Verifier | Callable, strategy: str | Strategy = "best-of-n", *,
           budget: Budget | int, seed: int = 0,
           heldout: Mapping[str, Verifier | Callable] | Sequence[Verifier] | None = None,
           checkpoint=None, resume: bool = False, on_checkpoint: Callable[[int], None] | None = None,
           distributed: bool = False, **settings) -> Result:
    """Search ``process`` for outputs ``verifier`` scores highly, within ``budget`` (NFE or a Budget).

    ``heldout`` verifiers score the chosen outputs after the search and are
    never used to select. With ``checkpoint=PATH`` the run saves resumable
    points; ``resume=True`` continues from that file to the identical result.
    With ``distributed=True`` under ``accelerate launch``, the candidates'
    model and verifier work is split over the processes, and every process
    returns the Result one process returns with the same seed.
    """
    from .core import MmttsError, Strategy
    from .core.strategy import run_strategy
    if isinstance(strategy, Strategy):
        if settings:
            raise MmttsError(f"settings {sorted(settings)} given with a Strategy instance; set them on the instance")
        strat = strategy
    else:
        strat = _registry("STRATEGIES").create(strategy, **settings)
    return run_strategy(strat, process, verifier, budget, seed=seed, heldout=heldout, checkpoint=checkpoint,
                        resume=resume, on_checkpoint=on_checkpoint, distributed=distributed)


__all__ = ["Adapter", "Budget", "BudgetError", "Cached", "MeanRank", "MmttsError", "Process", "Result", "State",
           "Strategy", "Verifier", "adapt", "create_strategy", "create_task", "create_verifier", "list_adapters", "list_strategies",
           "list_tasks", "list_verifiers", "search"]
