"""Coordinate spaces of GUI grounding answers, and conversion to pixels of the original screenshot.

Models answer in different units: absolute pixels of the screenshot they
were given (``pixel``), pixels of the resized image their processor fed
them (``resized``, with that image's size), fractions of the image
(``unit``, 0-1) or thousandths (``permille``, 0-1000, as Qwen-VL does).
Voting and metrics always work in pixels of the original screenshot, so the
space is stated once, explicitly, instead of guessed from the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core.errors import MmttsError

KINDS = ("pixel", "resized", "unit", "permille")


@dataclass(frozen=True)
class CoordSpace:
    """A coordinate space in which a model states its answers.

    Attributes:
        kind: one of ``KINDS``: ``"pixel"``, ``"resized"``, ``"unit"`` (0-1) or ``"permille"`` (0-1000).
        resized: the (width, height) of the resized image for kind ``"resized"``.
    """

    kind: str = "pixel"
    resized: tuple[int, int] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise MmttsError(f"unknown coordinate space {self.kind!r}; choose one of {', '.join(KINDS)} "
                             "(resized as 'resized:WxH')")
        if self.kind == "resized":
            if self.resized is None or len(self.resized) != 2 or min(self.resized) <= 0:
                raise MmttsError("coordinate space 'resized' needs the resized image size, e.g. 'resized:1288x728'")
            object.__setattr__(self, "resized", (int(self.resized[0]), int(self.resized[1])))
        elif self.resized is not None:
            raise MmttsError(f"coordinate space {self.kind!r} takes no resized size; use 'resized:WxH'")

    @classmethod
    def parse(cls, spec: "str | CoordSpace") -> "CoordSpace":
        """'pixel', 'unit', 'permille' or 'resized:WxH'."""
        if isinstance(spec, CoordSpace):
            return spec
        s = str(spec).strip().lower()
        if s.startswith("resized"):
            _, _, size = s.partition(":")
            try:
                w, h = (int(v) for v in size.split("x"))
            except ValueError:
                raise MmttsError(f"coordinate space {spec!r}: write the resized size as 'resized:WxH'") from None
            return cls("resized", (w, h))
        return cls(s)

    def __str__(self) -> str:
        return f"resized:{self.resized[0]}x{self.resized[1]}" if self.kind == "resized" else self.kind

    def units_per_pixel(self, image_size: tuple[int, int]) -> tuple[float, float]:
        """How many units of this space one original pixel spans, along x and y."""
        w, h = image_size
        if w <= 0 or h <= 0:
            raise MmttsError(f"image size {w}x{h} must be positive")
        if self.kind == "pixel":
            return 1.0, 1.0
        if self.kind == "resized":
            return self.resized[0] / w, self.resized[1] / h
        full = 1.0 if self.kind == "unit" else 1000.0
        return full / w, full / h

    def _factors(self, coords: np.ndarray, image_size) -> np.ndarray:
        c = np.asarray(coords, dtype=np.float64)
        if c.shape[-1] not in (2, 4):
            raise MmttsError(f"coordinates must end in 2 (x, y) or 4 (x1, y1, x2, y2) values; got shape {c.shape}")
        sx, sy = self.units_per_pixel(image_size)
        return np.tile([sx, sy], c.shape[-1] // 2)

    def to_pixels(self, coords, image_size: tuple[int, int]) -> np.ndarray:
        """Points (..., 2) or boxes (..., 4) in this space -> pixels of the original image."""
        return np.asarray(coords, dtype=np.float64) / self._factors(coords, image_size)

    def from_pixels(self, coords, image_size: tuple[int, int]) -> np.ndarray:
        """Points or boxes in original pixels -> this space."""
        return np.asarray(coords, dtype=np.float64) * self._factors(coords, image_size)
