"""mmtts: multimodal test-time scaling and adaptation.

    result = mmtts.search(process, verifier, "particle-filter", budget=640, seed=0)
    adapter = mmtts.adapt(model, "bn")

``import mmtts`` loads only the core (torch and numpy): every strategy, adapter,
task and verifier module is imported the first time its name is used, and the
subpackages (``mmtts.strategies``, ``mmtts.adapters``, ``mmtts.tasks``,
``mmtts.verifiers``, ``mmtts.modalities``, ``mmtts.kernels``) when first reached.
"""

from __future__ import annotations

import importlib
from typing import Callable, Mapping, Sequence

from .core import (Adapter, Budget, BudgetError, Cached, MeanRank, MmttsError, Process, Result, State, Strategy,
                   Verifier)
from .core.registry import ADAPTERS, STRATEGIES, TASKS, VERIFIERS
from .core.strategy import run_strategy

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'mmtts' has no attribute {name!r}")


_SUBPACKAGES = ("adapters", "bench", "cli", "core", "kernels", "modalities", "strategies", "tasks", "verifiers")


def list_strategies() -> list[str]:
    return STRATEGIES.names()


def list_adapters() -> list[str]:
    return ADAPTERS.names()


def list_tasks() -> list[str]:
    return TASKS.names()


def list_verifiers() -> list[str]:
    return VERIFIERS.names()


def create_strategy(name: str, **settings) -> Strategy:
    return STRATEGIES.create(name, **settings)


def create_task(name: str, **settings):
    return TASKS.create(name, **settings)


def adapt(model, method: str = "tent", **overrides) -> Adapter:
    """Wrap a classifier in a test-time adaptation method: ``logits = adapter(x)``; ``adapter.reset()``."""
    return ADAPTERS.create(method, model, **overrides)


def search(process: Process, verifier: Verifier | Callable, strategy: str | Strategy = "best-of-n", *,
           budget: Budget | int, seed: int = 0,
           heldout: Mapping[str, Verifier | Callable] | Sequence[Verifier] | None = None,
           checkpoint=None, resume: bool = False, on_checkpoint: Callable[[int], None] | None = None,
           **settings) -> Result:
    """Search ``process`` for outputs ``verifier`` scores highly, within ``budget`` (NFE or a Budget).

    ``heldout`` verifiers score the chosen outputs after the search and are
    never used to select. With ``checkpoint=PATH`` the run saves resumable
    points; ``resume=True`` continues from that file to the identical result.
    """
    if isinstance(strategy, Strategy):
        if settings:
            raise MmttsError(f"settings {sorted(settings)} given with a Strategy instance; set them on the instance")
        strat = strategy
    else:
        strat = STRATEGIES.create(strategy, **settings)
    return run_strategy(strat, process, verifier, budget, seed=seed, heldout=heldout, checkpoint=checkpoint,
                        resume=resume, on_checkpoint=on_checkpoint)


__all__ = ["Adapter", "Budget", "BudgetError", "Cached", "MeanRank", "MmttsError", "Process", "Result", "State",
           "Strategy", "Verifier", "adapt", "create_strategy", "create_task", "list_adapters", "list_strategies",
           "list_tasks", "list_verifiers", "search"]
