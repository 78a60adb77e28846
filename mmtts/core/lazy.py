"""Lazy packages: a package's submodules are imported when first reached as attributes."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable


def lazy_submodules(package: str, init_file: str, names: dict[str, str] | None = None
                    ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """A module ``__getattr__`` and ``__dir__`` that import ``package.<submodule>`` on first access.

    Args:
        package: the package's ``__name__``.
        init_file: the package's ``__file__``; its sibling modules and subpackages are the submodules.
        names: public names re-exported from submodules, name -> submodule (``{"Task": "base"}``).
    """
    here = Path(init_file).parent
    submodules = sorted({p.stem for p in here.glob("*.py") if p.stem != "__init__"} |
                        {p.parent.name for p in here.glob("*/__init__.py")})
    names = dict(names or {})

    def __getattr__(attr: str):
        if attr in names:
            return getattr(importlib.import_module(f"{package}.{names[attr]}"), attr)
        if attr in submodules:
            return importlib.import_module(f"{package}.{attr}")
        raise AttributeError(f"module {package!r} has no attribute {attr!r}")

    def __dir__() -> list[str]:
        return sorted(set(submodules) | set(names))

    return __getattr__, __dir__
