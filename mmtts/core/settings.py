"""Checks of strategy settings, so a bad value is refused when the strategy is built, naming the setting.

Each check returns the value in its canonical type (a whole float such as
``4.0`` becomes ``4``) or raises :class:`~mmtts.core.errors.SettingsError`
with the setting's name, what it must be and what was given.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
import warnings
from typing import Any, Iterable

from .errors import SettingsError


def _owner(owner: str) -> str:
    return f"{owner} " if owner else ""


def whole(name: str, value: Any, owner: str = "", minimum: int = 1, none: bool = False) -> int | None:
    """A whole number >= ``minimum`` (None allowed when ``none``)."""
    if value is None and none:
        return None
    ok = not isinstance(value, bool) and (isinstance(value, numbers.Integral)
                                          or (isinstance(value, numbers.Real) and math.isfinite(value)
                                              and float(value).is_integer()))
    if not ok or int(value) < minimum:
        extra = " (or None)" if none else ""
        raise SettingsError(f"{_owner(owner)}needs {name} >= {minimum}, a whole number{extra}; got {name}={value!r}")
    return int(value)


def real(name: str, value: Any, owner: str = "", low: float = -math.inf, high: float = math.inf,
         low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number in the interval from ``low`` to ``high`` (ends open when asked)."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise SettingsError(f"{_owner(owner)}{name}={value!r} must be a finite number in {lo}{low}, {high}{hi}")
    return float(value)


def flag(name: str, value: Any, owner: str = "") -> bool:
    """A bool (numpy bools too)."""
    if value is True or value is False or type(value).__name__ == "bool_":
        return bool(value)
    raise SettingsError(f"{_owner(owner)}{name}={value!r} must be True or False")


def choice(name: str, value: Any, options: Iterable[str], owner: str = "") -> str:
    """One of ``options``."""
    options = tuple(options)
    if not isinstance(value, str) or value not in options:
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SettingsError(f"{_owner(owner)}unknown {name} {value!r}; choose one of {options}{hint}")
    return value


def renamed(owner: str, name: str, value: Any, default: Any = None, **old: Any) -> Any:
    """The value of setting ``name``, or of its one old spelling among ``old`` (``samples=``, ``population=``)
    with a DeprecationWarning naming ``name``; ``default`` when neither is given. Both, or two old spellings,
    are refused."""
    given = {k: v for k, v in old.items() if v is not None}
    if len(given) > 1 or (given and value is not None):
        got = ([name] if value is not None else []) + sorted(given)
        raise SettingsError(f"{owner} got {name} twice ({', '.join(got)}); give it once, as {name}=")
    if given:
        (k, v), = given.items()
        warnings.warn(f"{owner}: {k}= is deprecated; use {name}=: pass {name}={v!r}", DeprecationWarning,
                      stacklevel=3)
        return v
    return default if value is None else value


def unknown_settings(who: str, unknown: Iterable[str], valid: list[str]) -> SettingsError:
    """The error for settings ``who`` does not take: each named with its closest valid one, then all valid ones."""
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, valid, n=1)
        hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return SettingsError(f"{who} has no setting {', '.join(hints)}; its settings are: {', '.join(valid) or '(none)'}")


def check_keywords(cls: type, args: tuple, kwargs: dict, owner: str = "") -> None:
    """Refuse arguments ``cls(*args, **kwargs)`` would not take, listing the settings it does take."""
    sig = inspect.signature(cls.__init__)
    try:
        sig.bind(None, *args, **kwargs)
        return
    except TypeError:
        pass
    params = [p for p in list(sig.parameters.values())[1:]
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    valid = [p.name for p in params]
    unknown = [k for k in kwargs if k not in valid]
    who = owner or cls.__name__
    if unknown:
        raise unknown_settings(who, unknown, valid)
    if args:
        raise SettingsError(f"{who} takes its settings by name ({', '.join(valid) or 'none'}); got "
                            f"{len(args)} positional argument(s)")
    missing = [p.name for p in params if p.default is p.empty and p.name not in kwargs]
    raise SettingsError(f"{who} needs the setting(s) {', '.join(missing)}; its settings are: {', '.join(valid)}")
