"""Region voting (GUI-RC): many sampled boxes vote on an integer grid; the answer is their consensus.

Every sample is an axis-aligned box on a W x H integer grid (a click point
becomes a square of side ``alpha`` around it). Each box adds one vote to
every grid cell it covers. The consensus region is the largest 4-connected
region of cells holding the maximum vote, and the answer is the centre of
its bounding box. Nothing here knows about screens, so the same strategy
votes over any process whose outputs are points or boxes on a grid (the
grid is the process's ``extent``).

Voting is an aggregation, not a search by score: :class:`RegionVote` draws
n candidates and builds one answer from all of them, so it needs no
verifier (``mmtts.search(process, None, "region-vote", ...)``), and what it
returns beside the answer is the vote share (``Result.votes``), never a
verifier score.

Two constructions give identical answers:

- :func:`consensus_reference` adds one slice per box to a full-resolution
  grid and labels that grid, as the published GUI-RC code does. Its cost
  grows with the grid (tens of milliseconds at 1920x1080).
- :func:`consensus` works on the *compressed* grid whose cell boundaries
  are the distinct box edges: at most 2K+1 columns and rows whatever the
  screen size. Votes are constant inside a compressed cell, two cells are
  4-adjacent exactly when their pixel blocks are, and a region's area is
  the sum of its cells' pixel areas, so the largest region, its tie-break
  (first in row-major order, as the labelling numbers regions) and its
  bounding box are the same as on the full grid.

The region-consistency reward of GUI-RCPO (:func:`region_rewards`) is each
box's mean vote over its own area divided by the maximum vote: 1 for a box
lying entirely inside the consensus, smaller the more it strays.

Every function here takes ``published``: False (the default) lets a box
cover every cell it overlaps (x1, y1 floored, x2, y2 ceiled); True truncates
every edge toward zero as the published GUI-RC and GUI-RCPO code does
(``int()``), so a box thinner than a cell after truncation casts no vote and
a vote can end with no answer where the default gives one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.errors import MmttsError
from ..core.registry import STRATEGIES
from ..core.settings import renamed
from ..core.strategy import SearchContext, Selection, Strategy
from ..core.verifier import Verifier


@dataclass(frozen=True)
class Consensus:
    """The outcome of a vote.

    ``point`` and ``region`` are None when no box voted.

    Attributes:
        point: the answer (x, y) in continuous grid coordinates, cell i covering [i, i+1).
        region: the bounding box (x1, y1, x2, y2) of the consensus region, exclusive at x2, y2.
        area: the region's size in cells.
        max_vote: the number of boxes covering it.
        votes: the boxes that voted (non-empty on the grid).
        samples: the number of boxes cast.
    """

    point: tuple[float, float] | None
    region: tuple[int, int, int, int] | None
    area: int
    max_vote: int
    votes: int
    samples: int


def check_extent(width: int, height: int) -> tuple[int, int]:
    """The grid size as two positive ints, or an MmttsError naming what was given."""
    try:
        w, h = int(width), int(height)
        whole = w == width and h == height
    except (TypeError, ValueError, OverflowError):
        whole = False
    if isinstance(width, bool) or isinstance(height, bool) or not whole or w < 1 or h < 1:
        raise MmttsError(f"grid size {width!r} x {height!r} must be positive whole numbers of cells "
                         "(the image size in pixels)")
    return w, h


def as_coords(values, name: str, cols: int) -> np.ndarray:
    """``values`` as a float64 (K, cols) array, or an MmttsError naming ``name``, what it needs and what came.

    NaN marks a missing answer and is kept; infinities, non-numeric dtypes and
    other shapes are refused (a sample with no answer is a NaN row, never inf).
    """
    what = "x, y" if cols == 2 else "x1, y1, x2, y2"
    if isinstance(values, torch.Tensor):
        if values.is_complex() or values.dtype == torch.bool:
            raise MmttsError(f"{name} must hold real coordinates ({what}); got a torch tensor of dtype {values.dtype}")
        values = values.detach().to("cpu", torch.float64).numpy()
    try:
        a = np.asarray(values)
    except ValueError:  # ragged nested lists
        raise MmttsError(f"{name} must be an array of shape (K, {cols}) ({what} per sample); got rows of "
                         "different lengths") from None
    if a.dtype.kind not in "iuf":
        raise MmttsError(f"{name} must hold real numbers ({what} per sample, NaN for a missing answer); "
                         f"got dtype {a.dtype}")
    if a.ndim != 2 or a.shape[1] != cols:
        raise MmttsError(f"{name} must have shape (K, {cols}) ({what} per sample); got shape {a.shape}")
    a = a.astype(np.float64)
    if np.isinf(a).any():
        raise MmttsError(f"{name} holds infinite coordinates in {int(np.isinf(a).any(1).sum())} of {len(a)} rows; "
                         "mark a sample with no usable answer with NaN")
    return a


def check_alpha(alpha) -> float:
    """``alpha`` as a positive finite float, or an MmttsError naming it."""
    try:
        ok = not isinstance(alpha, bool) and 0 < float(alpha) < float("inf")
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise MmttsError(f"alpha={alpha!r} must be a positive, finite box side in pixels (GUI-RC uses 50)")
    return float(alpha)


def point_boxes(points, alpha: float) -> np.ndarray:
    """Squares of side ``alpha`` centred on points (K, 2) -> boxes (K, 4); NaN points stay NaN."""
    half = check_alpha(alpha) / 2.0
    p = as_coords(points, "points", 2)
    return np.concatenate([p - half, p + half], axis=1)


def grid_boxes(boxes, width: int, height: int, published: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Float boxes (K, 4) -> integer cell ranges (K, 4) clipped to the grid, and which of them vote.

    By default a box covers cell i when it overlaps [i, i+1): x1 is floored
    and x2 ceiled. With ``published`` every edge is truncated toward zero
    (``int()``), then x1, y1 raised to 0 and x2, y2 lowered to the grid size,
    as the published code does. Rows with NaN, inverted corners (x2 < x1) or
    nothing left inside the grid cast no vote; they come back as zero boxes
    with ``votes`` False.
    """
    w, h = check_extent(width, height)
    b = as_coords(boxes, "boxes", 4)
    finite = np.isfinite(b).all(1)
    safe = np.where(finite[:, None], b, 0.0)
    if published:
        t = np.trunc(safe)
        edges = np.stack([np.maximum(t[:, 0], 0), np.maximum(t[:, 1], 0),
                          np.minimum(t[:, 2], w), np.minimum(t[:, 3], h)], 1)
        votes = finite & (edges[:, 2] > edges[:, 0]) & (edges[:, 3] > edges[:, 1])
    else:
        edges = np.concatenate([np.floor(safe[:, :2]), np.ceil(safe[:, 2:])], 1)
        votes = finite & (safe[:, 2] > safe[:, 0]) & (safe[:, 3] > safe[:, 1])
    out = np.empty(b.shape, dtype=np.int64)
    out[:, 0::2] = np.clip(edges[:, 0::2], 0, w)
    out[:, 1::2] = np.clip(edges[:, 1::2], 0, h)
    votes &= (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    out[~votes] = 0
    return out, votes


def _check_samples(boxes) -> np.ndarray:
    b = as_coords(boxes, "boxes", 4)
    if len(b) == 0:
        raise MmttsError("no samples to vote over (K = 0); draw at least one answer per example")
    return b


def _no_vote(k: int) -> Consensus:
    return Consensus(point=None, region=None, area=0, max_vote=0, votes=0, samples=k)


def largest_region(mask: np.ndarray, areas: np.ndarray | None = None) -> tuple[slice, slice, float]:
    """The largest 4-connected region of a 2-D boolean mask: its (rows, cols) bounding slices and its size.

    Each cell counts ``areas[i, j]`` (default 1); ties go to the region
    labelled first, i.e. the first in row-major order.
    """
    from scipy import ndimage  # loaded on the first vote, not with mmtts

    labels, count = ndimage.label(mask, structure=ndimage.generate_binary_structure(2, 1))  # edges, not corners
    weights = None if areas is None else areas.ravel()
    sizes = np.bincount(labels.ravel(), weights=weights, minlength=count + 1)[1:]
    best = int(np.argmax(sizes))
    rows, cols = ndimage.find_objects(labels)[best]
    return rows, cols, sizes[best]


# -- the reference construction ----------------------------------------------------------

def vote_grid_reference(boxes, width: int, height: int, published: bool = False) -> np.ndarray:
    """Votes per cell on the full grid (H, W), one slice-add per box."""
    ib, votes = grid_boxes(boxes, width, height, published)
    grid = np.zeros((int(height), int(width)), dtype=np.int32)
    for x1, y1, x2, y2 in ib[votes]:
        grid[y1:y2, x1:x2] += 1
    return grid


def consensus_of_grid(grid: np.ndarray, samples: int | None = None, votes: int | None = None) -> Consensus:
    """The largest 4-connected max-vote region of a full vote grid; ties go to the first in row-major order."""
    grid = np.asarray(grid)
    top = int(grid.max()) if grid.size else 0
    k = int(samples if samples is not None else top)
    if top <= 0:
        return _no_vote(k)
    rows, cols, area = largest_region(grid == top)
    region = (cols.start, rows.start, cols.stop, rows.stop)
    point = ((region[0] + region[2]) / 2.0, (region[1] + region[3]) / 2.0)
    return Consensus(point=point, region=region, area=int(area), max_vote=top,
                     votes=int(votes if votes is not None else top), samples=k)


def consensus_reference(boxes, width: int, height: int, published: bool = False) -> Consensus:
    """GUI-RC's answer built as the published code builds it: a full-resolution grid, labels over all of it."""
    boxes = _check_samples(boxes)
    _, valid = grid_boxes(boxes, width, height, published)
    grid = vote_grid_reference(boxes, width, height, published)
    return consensus_of_grid(grid, samples=len(valid), votes=int(valid.sum()))


# -- the compressed grid ---------------------------------------------------------------------

@dataclass(frozen=True)
class CompressedVotes:
    """Votes on the grid of distinct box edges: cell (i, j) spans xs[j]..xs[j+1] by ys[i]..ys[i+1].

    Attributes:
        xs: the sorted distinct x edges.
        ys: the sorted distinct y edges.
        votes: (len(ys) - 1, len(xs) - 1) int64 vote counts per cell.
        boxes: (K, 4) compressed indices of each voting box (j1, i1, j2, i2).
        valid: (K,) which boxes vote.
    """

    xs: np.ndarray
    ys: np.ndarray
    votes: np.ndarray       # (len(ys) - 1, len(xs) - 1) int64
    boxes: np.ndarray       # (K, 4) compressed indices of each voting box (j1, i1, j2, i2)
    valid: np.ndarray       # (K,) which boxes vote

    @property
    def areas(self) -> np.ndarray:
        return np.diff(self.ys)[:, None] * np.diff(self.xs)[None, :]


def compress_votes(boxes, width: int, height: int, published: bool = False) -> CompressedVotes:
    """Build the compressed vote grid with a 2-D difference array over edge indices (cost depends on K only)."""
    w, h = check_extent(width, height)
    ib, valid = grid_boxes(boxes, w, h, published)
    vb = ib[valid]
    xs = np.unique(np.concatenate([[0, w], vb[:, 0], vb[:, 2]]))
    ys = np.unique(np.concatenate([[0, h], vb[:, 1], vb[:, 3]]))
    cb = np.zeros_like(ib)
    cb[valid, 0] = np.searchsorted(xs, vb[:, 0])
    cb[valid, 2] = np.searchsorted(xs, vb[:, 2])
    cb[valid, 1] = np.searchsorted(ys, vb[:, 1])
    cb[valid, 3] = np.searchsorted(ys, vb[:, 3])
    diff = np.zeros((len(ys), len(xs)), dtype=np.int64)
    j1, i1, j2, i2 = cb[valid].T
    np.add.at(diff, (i1, j1), 1)
    np.add.at(diff, (i1, j2), -1)
    np.add.at(diff, (i2, j1), -1)
    np.add.at(diff, (i2, j2), 1)
    votes = diff.cumsum(0).cumsum(1)[:-1, :-1]
    return CompressedVotes(xs=xs, ys=ys, votes=votes, boxes=cb, valid=valid)


def consensus_of_compressed(cv: CompressedVotes) -> Consensus:
    k = len(cv.valid)
    top = int(cv.votes.max()) if cv.votes.size else 0
    if top <= 0:
        return _no_vote(k)
    # areas are whole numbers far below 2**53, so float sums are exact and ties compare exactly
    rows, cols, area = largest_region(cv.votes == top, cv.areas.astype(np.float64))
    region = (int(cv.xs[cols.start]), int(cv.ys[rows.start]), int(cv.xs[cols.stop]), int(cv.ys[rows.stop]))
    point = ((region[0] + region[2]) / 2.0, (region[1] + region[3]) / 2.0)
    return Consensus(point=point, region=region, area=int(area), max_vote=top,
                     votes=int(cv.valid.sum()), samples=k)


def consensus(boxes, width: int, height: int, published: bool = False) -> Consensus:
    """GUI-RC's answer on the compressed grid; identical to :func:`consensus_reference`.

    ``published`` truncates box edges as the published code does (see :func:`grid_boxes`).
    """
    boxes = _check_samples(boxes)
    return consensus_of_compressed(compress_votes(boxes, width, height, published))


def region_rewards(boxes, width: int, height: int, published: bool = False) -> np.ndarray:
    """GUI-RCPO's reward per box: votes inside it / (max vote * its area); 0 for boxes that cast no vote.

    Computed with a 2-D prefix sum of area-weighted votes over the
    compressed grid, so it is exact and independent of the screen size.
    """
    boxes = _check_samples(boxes)
    cv = compress_votes(boxes, width, height, published)
    out = np.zeros(len(cv.valid), dtype=np.float64)
    top = int(cv.votes.max()) if cv.votes.size else 0
    if top <= 0:
        return out
    mass = np.zeros((cv.votes.shape[0] + 1, cv.votes.shape[1] + 1), dtype=np.int64)
    mass[1:, 1:] = (cv.votes * cv.areas).cumsum(0).cumsum(1)
    j1, i1, j2, i2 = cv.boxes[cv.valid].T
    inside = mass[i2, j2] - mass[i1, j2] - mass[i2, j1] + mass[i1, j1]
    area = (cv.xs[j2] - cv.xs[j1]) * (cv.ys[i2] - cv.ys[i1])
    out[cv.valid] = inside / (top * area)
    return out


def vote_boxes(points=None, boxes=None, alpha: float = 50.0) -> np.ndarray:
    """One box per sample: a given box where the sample answered with one, else a point's alpha-square."""
    if points is None and boxes is None:
        raise MmttsError("region voting needs points (K, 2) or boxes (K, 4) to vote with")
    if boxes is None:
        return point_boxes(points, alpha)
    b = as_coords(boxes, "boxes", 4)
    if points is None:
        return b
    from_points = point_boxes(points, alpha)
    if len(from_points) != len(b):
        raise MmttsError(f"points ({len(from_points)} rows) and boxes ({len(b)} rows) must hold one row per "
                         "sample each (NaN where a sample gave the other kind of answer)")
    use_box = np.isfinite(b).all(1)
    return np.where(use_box[:, None], b, from_points)


def with_elements(boxes, elements) -> np.ndarray:
    """``boxes`` (K, 4) with each row whose element is known (a finite row of ``elements`` (K, 4)) replaced by
    that element's box; rows with a NaN element row stay as they are."""
    b = as_coords(boxes, "boxes", 4).copy()
    el = as_coords(elements, "elements", 4)
    if len(el) != len(b):
        raise MmttsError(f"{len(el)} element boxes for {len(b)} samples; give one (or a NaN row) per sample")
    known = np.isfinite(el).all(1)
    b[known] = el[known]
    return b


def snapped_vote_boxes(points=None, boxes=None, elements=None, alpha: float = 50.0) -> np.ndarray:
    """:func:`vote_boxes`, with each sample whose element is known voting with that element's box instead.

    ``elements`` (K, 4) holds the box of the element under each answer (NaN
    rows where none is known: those samples vote as they are).
    """
    votes = vote_boxes(points, boxes, alpha)
    return votes if elements is None else with_elements(votes, elements)


# -- the strategy ------------------------------------------------------------------------------

@STRATEGIES.register("region-vote")
class RegionVote(Strategy):
    """Draw n candidates and answer with the consensus of their votes (GUI-RC); no verifier is needed.

    Voting is an aggregation, not a selection by score: the answer is built
    from all n samples and is usually none of them. So the result's
    ``votes`` holds the vote share (the consensus's maximum vote over n) and
    its ``scores`` are NaN; pass ``verifier=None``. A verifier, when given,
    scores every sample (``population_scores`` and the trace) and never
    changes the answer.

    The process's outputs are a dict with ``points`` (n, 2) and/or
    ``boxes`` (n, 4) in grid coordinates, NaN where a sample gave no usable
    answer, and the process declares its grid as ``extent = (width,
    height)``. ``outputs`` is the consensus as a (1, 2) point (NaN when
    nothing voted); ``extra`` holds the :class:`Consensus`, ``n``, and how
    many samples ``voted`` or are ``missing``.

    Args:
        n: samples to draw (GUI-RC uses 64); None draws as many as the NFE budget pays for.
        alpha: side, in grid cells, of the square a point answer votes with (GUI-RC uses 50).
        published: truncate box edges with ``int()`` as the published GUI-RC code does (docs/gui.md lists
            what changes); the default lets a box cover every cell it overlaps.
        snap: each sample votes with the box of the element under its answer (the process's ``elements``
            output, e.g. a :class:`~mmtts.modalities.gui.ClickProcess` given ``elements=``) instead of its own
            box or alpha-square; samples on no known element vote as they are. Off in the published method.
        samples: deprecated spelling of ``n``.
        k: deprecated spelling of ``n``.
    """

    def __init__(self, n: int | None = None, alpha: float = 50.0, *, published: bool = False, snap: bool = False,
                 samples: int | None = None, k: int | None = None):
        n = renamed("region-vote", "n", n, samples=samples, k=k)
        if n is not None and (int(n) != n or n < 1):
            raise MmttsError(f"region-vote needs a whole number n >= 1 of samples (got n = {n}); GUI-RC uses 64")
        check_alpha(alpha)
        n = None if n is None else int(n)
        if not isinstance(snap, bool):
            raise MmttsError(f"region-vote snap={snap!r} must be True or False")
        super().__init__(n=n, alpha=alpha, published=bool(published), snap=snap)
        self.n, self.alpha, self.published, self.snap = n, float(alpha), bool(published), snap

    def run(self, ctx: SearchContext) -> Selection:
        process = ctx.process
        if process.extent is None:
            raise MmttsError(f"region-vote needs a process that declares extent = (width, height), the grid its "
                             f"points and boxes live on; {type(process).__name__}.extent is None")
        calls = 0 if ctx.verifier is None else 1
        cap = ctx.candidates_affordable(calls)
        n = self.n if self.n is not None else cap
        if n == -1:
            raise MmttsError("region-vote with n=None sizes n from an NFE budget; pass n or a budget with max_nfe")
        if cap != -1 and n > cap or n < 1:
            ctx.require_candidates(max(n, 1), calls)
        if self.snap and hasattr(process, "elements") and process.elements is None:  # refuse before sampling
            raise MmttsError(f"region-vote snap=True needs the element under each answer; this "
                             f"{type(process).__name__} has no elements (give it elements=: an ElementList of "
                             "boxes or DetectedElements)")
        state = ctx.advance(ctx.fresh(n))
        out = ctx.finish(state)
        if self.snap and "elements" not in out:
            raise MmttsError(f"region-vote snap=True needs the element under each answer; {type(process).__name__}'s "
                             "outputs hold no 'elements' (give ClickProcess its elements=)")
        c = consensus(snapped_vote_boxes(out.get("points"), out.get("boxes"), out.get("elements") if self.snap
                                         else None, self.alpha), *process.extent, published=self.published)
        population_scores = ctx.score(out, state) if ctx.verifier is not None else None
        point = torch.tensor([c.point if c.point is not None else (float("nan"),) * 2], dtype=torch.float64)
        return Selection(outputs=point, scores=torch.full((1,), float("nan"), dtype=torch.float64), state=None,
                         votes=torch.tensor([c.max_vote / n], dtype=torch.float64),
                         population=out, population_scores=population_scores,
                         extra={"consensus": c, "n": n, "voted": c.votes, "missing": n - c.votes})


class RegionConsistency(Verifier):
    """GUI-RCPO's region-consistency reward as a verifier: each sample scored against the batch it came in.

    The score of a sample depends on the other samples of its batch (as a
    rank does), so score the n samples of one prompt together.

    Args:
        width: the grid's width in cells (the screenshot's pixels).
        height: the grid's height in cells.
        alpha: side, in cells, of the square a point answer votes with (GUI-RC uses 50).
        published: truncate box edges with ``int()`` as the published code does.
    """

    name = "region-consistency"

    def __init__(self, width: int, height: int, alpha: float = 50.0, published: bool = False):
        super().__init__("error")
        self.extent = check_extent(width, height)
        self.alpha, self.published = check_alpha(alpha), bool(published)

    def score(self, outputs, context=None) -> torch.Tensor:
        if not isinstance(outputs, dict):
            raise MmttsError("region-consistency scores a dict of 'points' (K, 2) and/or 'boxes' (K, 4)")
        boxes = vote_boxes(outputs.get("points"), outputs.get("boxes"), self.alpha)
        return torch.from_numpy(region_rewards(boxes, *self.extent, published=self.published))
