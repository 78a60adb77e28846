"""Element proposals: the UI element under each answer, to snap sampled clicks and boxes onto elements.

A grounding answer is judged by the element it lands on, while region voting
works on pixels: samples spread over one large element, or written a row
off, leave their pixel consensus on slivers between elements. Snapping each
answer to the element under its point (a box answer: its centre) before the
vote makes the vote count elements. Proposals come from wherever a pipeline
has them: a list of element boxes (an accessibility tree, a DOM, an OCR
layout: :class:`ElementList`) or a detector run on the screenshot
(:class:`DetectedElements`, the project's :class:`~.model.ElementBoxNet`).

Every proposal source maps points (K, 2) in screenshot pixels to boxes
(K, 4) ``(x1, y1, x2, y2)`` in the same pixels, NaN where it knows no
element (or the point is NaN).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ...core.errors import MmttsError
from ...strategies.region_vote import as_coords, check_extent
from .model import boxes_at, image_tensor


class ElementProposals:
    """Where the UI elements are on one screenshot: :meth:`boxes_at` gives the element under each point."""

    def boxes_at(self, points) -> np.ndarray:
        raise NotImplementedError

    def snap(self, points) -> np.ndarray:
        """The centre of the element under each point (K, 2); the point itself where no element is known."""
        pts = as_coords(points, "points", 2)
        boxes = self.boxes_at(pts)
        ok = np.isfinite(boxes).all(1)
        out = pts.copy()
        out[ok] = (boxes[ok, :2] + boxes[ok, 2:]) / 2
        return out


class ElementList(ElementProposals):
    """Proposals from known element boxes: each point's element is the smallest box holding it (edges included).

    Args:
        boxes: (E, 4) element boxes ``(x1, y1, x2, y2)`` in screenshot pixels.
    """

    def __init__(self, boxes):
        b = as_coords(boxes, "element boxes", 4)
        if not np.isfinite(b).all() or (b[:, 2:] < b[:, :2]).any():
            raise MmttsError("element boxes must be finite (x1, y1, x2, y2) rows with x2 >= x1 and y2 >= y1")
        self.boxes = b

    def index_at(self, points) -> np.ndarray:
        """The index (K,) of the smallest box holding each point (the first of equal areas); -1 for none."""
        p = as_coords(points, "points", 2)
        b = self.boxes
        hit = ((b[None, :, 0] <= p[:, None, 0]) & (p[:, None, 0] <= b[None, :, 2])
               & (b[None, :, 1] <= p[:, None, 1]) & (p[:, None, 1] <= b[None, :, 3]))  # NaN compares False
        area = np.where(hit, ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[None, :], np.inf)
        return np.where(hit.any(1), area.argmin(1), -1)

    def boxes_at(self, points) -> np.ndarray:
        idx = self.index_at(points)
        out = np.full((len(idx), 4), np.nan)
        out[idx >= 0] = self.boxes[idx[idx >= 0]]
        return out


class DetectedElements(ElementProposals):
    """Proposals from an :class:`~.model.ElementBoxNet` run once on the screenshot.

    The network gives the box of the element under every cell of its grid;
    a point's element is the box of the cell holding it, in pixels of the
    original screenshot.

    Args:
        net: the element-box network (its ``cells`` grid, (columns, rows)).
        image: the screenshot (any size: it is resized to the network's input).
        image_size: the original screenshot's (width, height), the pixels points and boxes are in.
    """

    def __init__(self, net: torch.nn.Module, image: Image.Image, image_size: tuple[int, int]):
        self.size = check_extent(*image_size)
        self.cols, self.rows = (int(c) for c in net.cells)
        with torch.no_grad():
            self.extents = net(image_tensor([image]))
        if tuple(self.extents.shape[-2:]) != (self.rows, self.cols):
            raise MmttsError(f"the element-box network gave a {tuple(self.extents.shape[-2:])} grid for its cells "
                             f"{(self.cols, self.rows)} (columns, rows); check the network")

    def boxes_at(self, points) -> np.ndarray:
        p = as_coords(points, "points", 2)
        w, h = self.size
        out = np.full((len(p), 4), np.nan)
        ok = np.isfinite(p).all(1)
        if ok.any():
            col = np.clip(np.floor(p[ok, 0] / w * self.cols), 0, self.cols - 1).astype(np.int64)
            row = np.clip(np.floor(p[ok, 1] / h * self.rows), 0, self.rows - 1).astype(np.int64)
            cells = torch.from_numpy(row * self.cols + col)[None]
            out[ok] = boxes_at(self.extents, cells)[0].numpy() * np.array([w, h, w, h], dtype=np.float64)
        return out


__all__ = ["DetectedElements", "ElementList", "ElementProposals"]
