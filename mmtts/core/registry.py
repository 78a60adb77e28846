"""Name -> class registries, one per kind, with one factory each (as timm's create_model).

The registries are lazy: :data:`CATALOG` says which module defines each
built-in name, and that module is imported the first time the name is asked
for, so ``import mmtts`` loads no strategy, task, renderer or model library.
A module outside mmtts registers its own classes with the decorator as usual.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import warnings
from typing import Callable, Generic, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names of one kind (strategy, adapter, task, verifier) mapped to the classes that implement them.

    Args:
        kind: what the names are, for messages ("strategy").
        catalog: built-in name -> module defining it; the module is imported on first use of the name.
    """

    def __init__(self, kind: str, catalog: dict[str, str] | None = None):
        self.kind = kind
        self._items: dict[str, type[T]] = {}
        self._catalog = dict(catalog or {})

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def deco(cls: type[T]) -> type[T]:
            if name != name.lower() or "_" in name or " " in name:
                raise ValueError(f"{self.kind} name {name!r} must be kebab-case (lower case, words joined by '-')")
            if name in self._items and self._items[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered to {self._items[name].__name__}")
            self._items[name] = cls
            if not cls.__dict__.get("name"):  # a subclass registered under its own name does not keep its base's
                cls.name = name
            return cls
        return deco

    def get(self, name: str) -> type[T]:
        name = self._canonical(name)
        if isinstance(name, str) and name not in self._items and name in self._catalog:
            importlib.import_module(self._catalog[name])
            if name not in self._items:
                raise RuntimeError(f"module {self._catalog[name]} does not register {self.kind} {name!r}")
        if not isinstance(name, str) or name not in self._items:
            valid = ", ".join(self.names()) or "(none registered)"
            close = difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid {self.kind} names: {valid}{hint}")
        return self._items[name]

    def _canonical(self, name):
        """Registry names are kebab-case; an old snake_case spelling still resolves, with a warning."""
        if isinstance(name, str) and name not in self._items and name not in self._catalog and "_" in name:
            kebab = name.replace("_", "-")
            if kebab in self._items or kebab in self._catalog:
                warnings.warn(f"{self.kind} name {name!r} is deprecated; use {kebab!r}", DeprecationWarning,
                              stacklevel=4)
                return kebab
        return name

    def create(self, name: str, /, *args, **kwargs) -> T:
        """Build the class registered as ``name``; a setting it does not take is refused, listing the ones it does."""
        cls = self.get(name)
        valid = accepted_settings(cls)
        unknown = [] if valid is None else [k for k in kwargs if k not in valid]
        if unknown:
            from .settings import unknown_settings
            raise unknown_settings(f"{self.kind} {self._canonical(name)!r}", unknown, valid)
        return cls(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(set(self._items) | set(self._catalog))

    def catalog(self) -> dict[str, str]:
        """Built-in name -> defining module (nothing imported)."""
        return dict(self._catalog)

    def __contains__(self, name: str) -> bool:
        name = self._canonical(name)
        return name in self._items or name in self._catalog


def accepted_settings(cls: type) -> list[str] | None:
    """The keyword settings ``cls(...)`` takes: its ``__init__``'s named parameters, and those of every base
    ``__init__`` that the keywords are passed on to (through ``**kwargs``). None when some ``__init__`` takes
    any keyword itself (a task's options): the class then checks its own."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object:
            return None
        params = list(inspect.signature(init).parameters.values())[1:]
        names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in names]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names
    return None


def _modules(package: str, names: dict[str, str]) -> dict[str, str]:
    return {name: f"{package}.{module}" for name, module in names.items()}


#: every built-in name of each kind and the module that registers it
CATALOG = {
    "strategy": _modules("mmtts.strategies", {
        "best-of-n": "best_of_n", "beam": "beam", "particle-filter": "particle_filter", "zero-order": "zero_order",
        "paths": "paths", "evosearch": "evosearch", "region-vote": "region_vote",
        "sample-verify": "sample_verify", "robomonkey": "robomonkey", "tts-var": "tts_var",
        "tree-of-frames": "tree_of_frames"}),
    "adapter": _modules("mmtts.adapters", {
        "source": "source", "bn": "bn", "alpha-bn": "alpha_bn", "tent": "tent", "eta": "eata", "eata": "eata",
        "sar": "sar", "deyo": "deyo", "gui-rcpo": "gui_rcpo"}),
    "task": _modules("mmtts.tasks", {
        "toy-gmm": "toy_gmm", "image-search": "image_search", "tta-corruptions": "tta_corruptions",
        "tta-pretrained": "tta_pretrained", "vla-mujoco": "vla_mujoco", "gui-grounding": "gui_grounding",
        "var-search": "var_search", "gui-grounding-vlm": "gui_grounding", "video-search": "video_search"}),
    "verifier": {"toy-quadratic": "mmtts.modalities.toy_gmm", "toy-log-density": "mmtts.modalities.toy_gmm",
                 "classifier": "mmtts.verifiers.classifier", "clip": "mmtts.verifiers.clip",
                 "frames": "mmtts.verifiers.video", "temporal-consistency": "mmtts.verifiers.video",
                 "per-depth": "mmtts.verifiers.video", "checklist": "mmtts.verifiers.video"},
}

STRATEGIES: Registry = Registry("strategy", CATALOG["strategy"])
ADAPTERS: Registry = Registry("adapter", CATALOG["adapter"])
TASKS: Registry = Registry("task", CATALOG["task"])
VERIFIERS: Registry = Registry("verifier", CATALOG["verifier"])
