"""Offline benchmark tasks: data, reference models cached locally, metrics (imported on first use)."""

from ..core.lazy import lazy_submodules

__all__ = ["ModelCache", "Task"]
__getattr__, __dir__ = lazy_submodules(__name__, __file__, {"Task": "base", "ModelCache": "cache"})
