"""Name -> class registries, one per kind, with one factory each (as timm's create_model)."""

from __future__ import annotations

import difflib
import warnings
from typing import Callable, Generic, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def deco(cls: type[T]) -> type[T]:
            if name != name.lower() or "_" in name or " " in name:
                raise ValueError(f"{self.kind} name {name!r} must be kebab-case (lower case, words joined by '-')")
            if name in self._items and self._items[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered to {self._items[name].__name__}")
            self._items[name] = cls
            if getattr(cls, "name", None) in (None, ""):
                cls.name = name
            return cls
        return deco

    def get(self, name: str) -> type[T]:
        name = self._canonical(name)
        if not isinstance(name, str) or name not in self._items:
            valid = ", ".join(self.names()) or "(none registered)"
            close = difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid {self.kind} names: {valid}{hint}")
        return self._items[name]

    def _canonical(self, name):
        """Registry names are kebab-case; an old snake_case spelling still resolves, with a warning."""
        if isinstance(name, str) and name not in self._items and "_" in name:
            kebab = name.replace("_", "-")
            if kebab in self._items:
                warnings.warn(f"{self.kind} name {name!r} is deprecated; use {kebab!r}", DeprecationWarning,
                              stacklevel=4)
                return kebab
        return name

    def create(self, name: str, *args, **kwargs) -> T:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return self._canonical(name) in self._items


STRATEGIES: Registry = Registry("strategy")
ADAPTERS: Registry = Registry("adapter")
TASKS: Registry = Registry("task")
VERIFIERS: Registry = Registry("verifier")
