"""Property-based fuzzing of GUI grounding: voting, rewards, the region-vote strategy and the answer parser.

Inputs are random point and box arrays of random shapes and dtypes (lists,
numpy arrays, torch tensors), with NaN, infinities, huge values, one-decimal
coordinates, empty batches and batch 1, on random extents (some invalid),
with the default and the published edge rule. Every property is: the call
either succeeds with an answer that lies inside the extent (or the documented
"no answer": ``point`` None, a NaN output row, a missing parse) and rewards
in [0, 1], or raises an :class:`~mmtts.core.errors.MmttsError`; never a raw
numpy, torch or Python error, no numpy warning, and never a hang (each example
runs under a wall-clock alarm). Example counts follow the hypothesis profile
registered in conftest.py: ``ci`` by default, ``HYPOTHESIS_PROFILE=long`` for
the long run.
"""

from __future__ import annotations

import math
import signal
import warnings
from contextlib import contextmanager

import numpy as np
import torch
from hypothesis import event, given
from hypothesis import strategies as st

import mmtts
from mmtts.adapters.gui_rcpo import grouped_region_rewards, published_region_rewards
from mmtts.core.errors import MmttsError
from mmtts.core.process import Process
from mmtts.core.state import State
from mmtts.modalities.gui.parse import parse_answers
from mmtts.strategies.region_vote import (RegionConsistency, consensus, consensus_reference, point_boxes,
                                          region_rewards, vote_boxes)

HANG_SECONDS = 20
NAN, INF = float("nan"), float("inf")
ODD_DTYPES = ["float32", "float16", "int64", "uint8", "bool", "complex128", "object", "str"]


@contextmanager
def no_hang(seconds: int = HANG_SECONDS):
    def stop(*_):
        raise TimeoutError(f"example ran past {seconds} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def guarded(call):
    """The call's result, or None when it raised an MmttsError; anything else (or a numpy warning) fails."""
    with no_hang(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        try:
            out = call()
        except MmttsError as e:
            assert str(e), "an MmttsError must say what is wrong"
            event("refused with an MmttsError")
            return None
    event("answered")
    return out


def mostly(valid, bad, percent_bad: int = 15):
    """``valid`` most of the time, ``bad`` in about ``percent_bad`` % of draws."""
    return st.integers(0, 99).flatmap(lambda r: bad if r < percent_bad else valid)


coords = st.one_of(st.floats(-60, 500, allow_nan=False).map(lambda v: round(v, 1)),   # one-decimal coordinates
                   st.integers(-5, 300).map(float))
specials = st.sampled_from([NAN] * 6 + [INF, -INF, 1e300, -1e300])
values = mostly(coords, specials, 3)
ROWS = [0, 1, 1, 2, 3, 5, 8, 16]


@st.composite
def coord_arrays(draw, cols: int, rows: int | None = None):
    """Mostly (rows, cols) float arrays (rows drawn when not given), sometimes other shapes, dtypes, containers."""
    if draw(st.integers(0, 9)) < 8:
        shape = (draw(st.sampled_from(ROWS)) if rows is None else rows, cols)
    else:
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    size = int(np.prod(shape)) if shape else 1
    a = np.array(draw(st.lists(values, min_size=size, max_size=size)), dtype=np.float64).reshape(shape)
    dtype = draw(mostly(st.just("float64"), st.sampled_from(ODD_DTYPES), 20))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = a.astype(dtype)
    container = draw(st.sampled_from(["numpy", "numpy", "list", "torch"]))
    if container == "list":
        rows = a.tolist()
        if a.ndim == 2 and len(rows) > 1 and draw(st.integers(0, 9)) == 0:
            rows[-1] = rows[-1][:-1]                      # ragged rows
        return rows
    if container == "torch" and a.dtype.kind in "fiub":
        return torch.from_numpy(np.ascontiguousarray(a)).to(draw(st.sampled_from([None, torch.bfloat16])))
    return a


extents = mostly(st.tuples(st.integers(1, 400), st.integers(1, 400)),
                 st.tuples(st.sampled_from([0, -3, 2.5, NAN, INF, "640", None, True]), st.integers(1, 50)), 10)
alphas = mostly(st.sampled_from([50.0, 50.0, 9.0, 1.0, 0.5]), st.sampled_from([0.0, -5.0, NAN, INF, "50"]), 10)


def check_consensus(c, k: int, extent) -> None:
    w, h = extent
    assert c.samples == k and 0 <= c.votes <= k and 0 <= c.max_vote <= c.votes
    if c.point is None:
        assert c.region is None and c.max_vote == 0
        return
    x1, y1, x2, y2 = c.region
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and 0 < c.area <= (x2 - x1) * (y2 - y1)
    assert 0 <= c.point[0] <= w and 0 <= c.point[1] <= h and c.max_vote >= 1


@given(points=coord_arrays(2), extent=extents, alpha=alphas, published=st.booleans())
def test_consensus_of_points_answers_inside_the_extent_or_refuses(points, extent, alpha, published):
    c = guarded(lambda: consensus(point_boxes(points, alpha), *extent, published=published))
    if c is not None:
        check_consensus(c, len(points), extent)
        if extent[0] * extent[1] <= 40_000:   # the full-grid construction agrees wherever it is affordable
            assert guarded(lambda: consensus_reference(point_boxes(points, alpha), *extent, published=published)) == c


@given(boxes=coord_arrays(4), extent=extents, published=st.booleans())
def test_consensus_and_rewards_of_boxes(boxes, extent, published):
    c = guarded(lambda: consensus(boxes, *extent, published=published))
    if c is not None:
        check_consensus(c, len(boxes), extent)
    r = guarded(lambda: region_rewards(boxes, *extent, published=published))
    if r is not None:
        assert r.shape == (len(boxes),) and np.isfinite(r).all() and ((0 <= r) & (r <= 1 + 1e-12)).all()
        assert c is None or c.max_vote == 0 or r.max() > 0


def points_and_boxes(rows=st.sampled_from(ROWS), boxes_may_be_none: bool = False):
    """(points, boxes) of one row count (sometimes boxes of another); boxes may be None if asked."""
    def pair(k):
        boxes = coord_arrays(4, k)
        if boxes_may_be_none:
            boxes = st.one_of(st.none(), boxes)
        return st.tuples(st.just(k), coord_arrays(2, k), mostly(boxes, coord_arrays(4), 10))
    return rows.flatmap(pair)


@given(answers=points_and_boxes(), extent=extents, alpha=alphas, published=st.booleans())
def test_mixed_answers_vote_and_score(answers, extent, alpha, published):
    _, points, boxes = answers
    b = guarded(lambda: vote_boxes(points, boxes, alpha))
    if b is not None:
        assert b.shape == (len(boxes), 4) and b.dtype == np.float64 and not np.isinf(b).any()
    scores = guarded(lambda: RegionConsistency(*extent, alpha=alpha, published=published).score(
        {"points": points, "boxes": boxes}))
    if scores is not None:
        assert scores.shape == (len(boxes),) and torch.isfinite(scores).all()
        assert ((0 <= scores) & (scores <= 1 + 1e-12)).all()


@given(answers=points_and_boxes(boxes_may_be_none=True), data=st.data(),
       branch=mostly(st.sampled_from(["ui-tars", "qwen"]), st.just("intern"), 10),
       grow=mostly(st.sampled_from([100, 0, 25]), st.sampled_from([-1, 2.5]), 10))
def test_grouped_rewards_default_and_published(answers, data, branch, grow):
    k, points, boxes = answers
    groups = np.array(data.draw(st.lists(st.integers(0, 2), min_size=k, max_size=k)), dtype=np.int64)
    sizes = {g: data.draw(st.tuples(st.integers(1, 300), st.integers(1, 300))) for g in range(3)}
    for reward in (lambda: grouped_region_rewards(points, groups, sizes, 50.0, boxes=boxes),
                   lambda: published_region_rewards(points, groups, sizes, boxes=boxes, branch=branch,
                                                    point_expand_size=grow)):
        r = guarded(reward)
        if r is not None:
            assert r.shape == (k,) and np.isfinite(r).all() and ((0 <= r) & (r <= 1 + 1e-12)).all()


class Answers(Process):
    """A one-stage process whose outputs are whatever the test hands it (possibly malformed)."""

    num_stages, nfe_per_stage = 1, 1

    def __init__(self, outputs: dict, extent):
        self.outputs, self.extent = outputs, extent

    def init(self, streams, first_index=0):
        return State.fresh({"x": torch.zeros(len(streams), 1)}, streams, first_index)

    def step(self, state):
        return State(state.data, state.stage + 1, state.streams, state.ids, state.parents, state.origin, state.meta)

    def finish(self, state):  # numeric numpy arrays come out as tensors, as a real process returns them
        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) and v.dtype.kind in "fiucb" else v
                for k, v in self.outputs.items()}


@given(answers=points_and_boxes(st.sampled_from([1, 1, 2, 3, 5, 8, 16]), boxes_may_be_none=True), extent=extents,
       alpha=alphas, published=st.booleans(), seed=st.integers(0, 2**32))
def test_region_vote_strategy_answers_inside_the_extent_or_refuses(answers, extent, alpha, published, seed):
    n, points, boxes = answers
    out = {"points": points} if boxes is None else {"points": points, "boxes": boxes}
    res = guarded(lambda: mmtts.search(Answers(out, extent), None, "region-vote", budget=n, seed=seed, n=n,
                                       alpha=alpha, published=published))
    if res is None:
        return
    x, y = res.outputs[0].tolist()
    share = float(res.votes[0])
    if math.isnan(x):
        assert math.isnan(y) and share == 0.0 and res.extra["consensus"].point is None
    else:
        assert 0 <= x <= extent[0] and 0 <= y <= extent[1] and 0 < share <= 1
    assert res.extra["voted"] + res.extra["missing"] == n and torch.isnan(res.scores).all()


answer_texts = st.one_of(
    st.text(max_size=40),
    st.tuples(st.sampled_from(["({}, {})", "[{}, {}]", "click(x={}, y={})", '{{"x": {}, "y": {}}}', "{} {}"]),
              st.lists(st.one_of(values.map(repr), st.sampled_from(["1e309", "-0", ".5", "1e400", "nan"])),
                       min_size=2, max_size=2)).map(lambda t: t[0].format(*t[1])),
    st.lists(values.map(repr), min_size=4, max_size=4).map(lambda v: "[" + ", ".join(v) + "]"),
    st.sampled_from([None, 3, b"(1, 2)"]),
)


@given(texts=mostly(st.lists(answer_texts, max_size=8), answer_texts, 10),
       space=mostly(st.sampled_from(["pixel", "unit", "permille", "resized:1288x728"]),
                    st.sampled_from(["resized:0x5", "inches"]), 10),
       size=extents)
def test_parser_gives_pixels_or_a_missing_answer(texts, space, size):
    p = guarded(lambda: parse_answers(texts, space, size))
    if p is None:
        return
    k = len(texts)
    assert p.points.shape == (k, 2) and p.boxes.shape == (k, 4) and p.ok.shape == (k,)
    assert np.isfinite(p.points[p.ok]).all() and np.isnan(p.points[~p.ok]).all()
    assert not np.isinf(p.boxes).any()
