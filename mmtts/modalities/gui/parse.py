"""Reading model answers: text in, a point or a box in original pixels out, or a missing vote.

Models write clicks in many ways: ``(x, y)``, ``[x1, y1, x2, y2]``,
``click(x=12, y=34)``, ``{"x": 0.4, "y": 0.7}``, ``<box>(x1,y1),(x2,y2)</box>``.
The parser tries the explicit forms first and falls back to a bare answer
holding exactly two or four numbers. Anything else (prose, one number,
NaN, a non-string) is a *missing* answer: it is counted and reported, and
it never raises, because one bad sample among K must not stop a vote.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ...core.errors import MmttsError
from .coords import CoordSpace

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_BRACKET = re.compile(rf"[\[(]\s*({_NUM})\s*,\s*({_NUM})\s*(?:,\s*({_NUM})\s*,\s*({_NUM})\s*)?[\])]")
_PAIRS = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
_KEYED = re.compile(rf"\bx\s*['\"]?\s*[=:]\s*({_NUM}).*?\by\s*['\"]?\s*[=:]\s*({_NUM})", re.S)
_ANY = re.compile(_NUM)


def parse_answer(text) -> tuple[str, tuple[float, ...]] | None:
    """("point", (x, y)) or ("box", (x1, y1, x2, y2)) in the answer's own units, or None."""
    if not isinstance(text, str):
        return None
    nums = None
    for pattern in (_PAIRS, _BRACKET, _KEYED):
        m = pattern.search(text)
        if m:
            nums = [g for g in m.groups() if g is not None]
            break
    if nums is None:
        found = _ANY.findall(text)
        nums = found if len(found) in (2, 4) else None
    if nums is None:
        return None
    vals = tuple(float(v) for v in nums)
    if not all(math.isfinite(v) for v in vals):
        return None
    if len(vals) == 4:
        x1, y1, x2, y2 = vals
        return "box", (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
    return "point", vals


@dataclass
class ParsedAnswers:
    """K answers in original pixels.

    Attributes:
        points: (K, 2) answer points (a box's centre for box answers).
        boxes: (K, 4) answer boxes (NaN for point answers).
        ok: (K,) which answers parsed.
    """

    points: np.ndarray
    boxes: np.ndarray
    ok: np.ndarray

    @property
    def parse_rate(self) -> float:
        return float(self.ok.mean()) if len(self.ok) else 0.0


def parse_answers(texts: Sequence, space: CoordSpace | str, image_size: tuple[int, int]) -> ParsedAnswers:
    """Parse K answers and convert them from ``space`` to pixels of an image of ``image_size`` (w, h).

    An answer that parses but lands outside the float range once converted is a missing answer too.
    """
    from ...strategies.region_vote import check_extent

    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise MmttsError(f"texts must be a list of K answers (one string per sample); got {type(texts).__name__}")
    try:
        image_size = check_extent(*image_size)
    except TypeError:
        raise MmttsError(f"image_size must be the screenshot's (width, height); got {image_size!r}") from None
    space = CoordSpace.parse(space)
    k = len(texts)
    points = np.full((k, 2), np.nan)
    boxes = np.full((k, 4), np.nan)
    ok = np.zeros(k, dtype=bool)
    for i, t in enumerate(texts):
        a = parse_answer(t)
        if a is None:
            continue
        kind, vals = a
        with np.errstate(over="ignore"):
            px = space.to_pixels(np.array(vals), image_size)
        if not np.isfinite(px).all():
            continue
        if kind == "box":
            boxes[i] = px
            points[i] = [(px[0] + px[2]) / 2, (px[1] + px[3]) / 2]
        else:
            points[i] = px
        ok[i] = True
    return ParsedAnswers(points=points, boxes=boxes, ok=ok)


def format_point(x: float, y: float, space: CoordSpace | str, image_size: tuple[int, int]) -> str:
    """A point in original pixels written in ``space`` the way the project's samplers answer: "(x, y)"."""
    space = CoordSpace.parse(space)
    u = space.from_pixels(np.array([x, y]), image_size)
    digits = 4 if space.kind == "unit" else 1
    return f"({u[0]:.{digits}f}, {u[1]:.{digits}f})"
