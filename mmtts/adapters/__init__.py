"""Test-time adaptation methods, one module each, registered by name and imported on first use."""

from ..core.lazy import lazy_submodules

__getattr__, __dir__ = lazy_submodules(__name__, __file__)
