"""Region voting: the compressed grid against the full-resolution reference, consensus, rewards, bad input."""

import numpy as np
import pytest
import torch

from mmtts.core.errors import MmttsError
from mmtts.strategies.region_vote import (RegionConsistency, consensus, consensus_of_grid, consensus_reference,
                                      grid_boxes, point_boxes, region_rewards, vote_boxes, vote_grid_reference)


def random_boxes(rng, w, h, k):
    """A mix of the hard cases: border-touching, nested, disjoint, duplicated, empty and outside boxes."""
    kind = rng.integers(6)
    c = rng.uniform(-0.2, 1.2, (k, 2)) * [w, h]
    half = rng.uniform(0, 0.4, (k, 2)) * [w, h]
    b = np.concatenate([c - half, c + half], 1)
    if kind == 1:      # nested: shrinking boxes around one centre
        c0 = rng.uniform(0, 1, 2) * [w, h]
        s = np.sort(rng.uniform(0.5, max(w, h), k))[::-1, None] / 2
        b = np.concatenate([c0 - s, c0 + s], 1)
    elif kind == 2:    # touching the borders
        b[:, 0] = np.minimum(b[:, 0], 0)
        b[:, 3] = np.maximum(b[:, 3], h)
    elif kind == 3:    # duplicates, which make ties between equal components likely
        b = np.tile(b[: max(1, k // 3)], (3, 1))[:k]
    elif kind == 4:    # some empty or degenerate boxes
        flat = rng.random(k) < 0.4
        b[flat, 2] = b[flat, 0]
        b[rng.random(k) < 0.3] = np.nan
    if rng.random() < 0.5:
        b = np.round(b)
    return b


def test_fast_equals_reference_on_random_sets():
    rng = np.random.default_rng(0)
    kinds_seen = 0
    for _ in range(1500):
        w, h = (int(v) for v in rng.integers(1, 48, 2))
        k = int(rng.integers(1, 14))
        b = random_boxes(rng, w, h, k)
        fast, ref = consensus(b, w, h), consensus_reference(b, w, h)
        assert fast == ref, (b.tolist(), w, h)
        kinds_seen += fast.point is None
    assert kinds_seen > 0  # the sweep includes votes where nothing lands on the grid


def test_fast_equals_reference_on_disjoint_equal_ties():
    # four equal disjoint squares: the first in row-major order (lowest y, then x) wins
    b = np.array([[30, 20, 40, 30], [5, 20, 15, 30], [5, 2, 15, 12], [30, 2, 40, 12]], dtype=float)
    fast, ref = consensus(b, 50, 40), consensus_reference(b, 50, 40)
    assert fast == ref
    assert fast.region == (5, 2, 15, 12)
    # components of equal area but different shapes: still the row-major first one
    b = np.array([[10, 10, 30, 15], [0, 0, 5, 20]], dtype=float)
    assert consensus(b, 40, 30) == consensus_reference(b, 40, 30)
    assert consensus(b, 40, 30).region == (0, 0, 5, 20)


def test_fast_equals_reference_on_screen_sized_points():
    rng = np.random.default_rng(1)
    for w, h in ((1920, 1080), (3840, 2160), (1280, 720)):
        for k in (1, 8, 64):
            pts = rng.normal([w * 0.3, h * 0.6], [80, 40], (k, 2))
            if k > 1:
                pts[: k // 4] = rng.uniform(0, 1, (k // 4, 2)) * [w, h]
            b = point_boxes(pts, 50)
            assert consensus(b, w, h) == consensus_reference(b, w, h)


def test_consensus_on_hand_built_grids():
    g = np.zeros((6, 8), dtype=int)
    g[0, 0:2] = 3            # a 2-cell max region
    g[3:5, 4:7] = 3          # a 6-cell max region: the largest
    g[5, 0:8] = 2            # more cells, lower vote
    c = consensus_of_grid(g)
    assert c.max_vote == 3 and c.area == 6 and c.region == (4, 3, 7, 5) and c.point == (5.5, 4.0)
    # diagonal neighbours are not 4-connected: two 1-cell regions, the first in row-major order wins
    g = np.zeros((4, 4), dtype=int)
    g[1, 2] = g[2, 1] = 5
    c = consensus_of_grid(g)
    assert c.area == 1 and c.region == (2, 1, 3, 2)
    # an L-shaped region: its answer is the centre of its bounding box
    g = np.zeros((5, 5), dtype=int)
    g[0:4, 0] = g[3, 0:4] = 1
    c = consensus_of_grid(g)
    assert c.area == 7 and c.region == (0, 0, 4, 4) and c.point == (2.0, 2.0)
    assert consensus_of_grid(np.zeros((3, 3), dtype=int)).point is None


def test_reference_grid_counts_votes():
    b = np.array([[0, 0, 2, 2], [1, 1, 3, 3]], dtype=float)
    g = vote_grid_reference(b, 4, 4)
    assert g.tolist() == [[1, 1, 0, 0], [1, 2, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    c = consensus(b, 4, 4)
    assert c.region == (1, 1, 2, 2) and c.max_vote == 2 and c.point == (1.5, 1.5)


def direct_rewards(b, w, h):
    ib, ok = grid_boxes(b, w, h)
    g = vote_grid_reference(b, w, h)
    out = []
    for (x1, y1, x2, y2), v in zip(ib, ok):
        out.append(g[y1:y2, x1:x2].sum() / (g.max() * (x2 - x1) * (y2 - y1)) if v else 0.0)
    return np.array(out)


def test_reward_matches_direct_computation():
    rng = np.random.default_rng(2)
    for _ in range(300):
        w, h = (int(v) for v in rng.integers(1, 40, 2))
        b = random_boxes(rng, w, h, int(rng.integers(1, 10)))
        np.testing.assert_allclose(region_rewards(b, w, h), direct_rewards(b, w, h), rtol=1e-12, atol=0)
    # a box inside the consensus scores 1; an outlier scores its own votes over the max
    b = point_boxes([[50, 50], [50, 50], [52, 50], [150, 150]], 10)
    r = region_rewards(b, 200, 200)
    assert r[0] == r[1] and 0.5 < r[2] < 1 and r[0] > r[2] and r[3] == pytest.approx(1 / 3)


def test_verifier_scores_samples_by_region_consistency():
    pts = torch.tensor([[10.0, 10.0], [11.0, 10.0], [float("nan"), float("nan")]], dtype=torch.float64)
    s = RegionConsistency(100, 100, alpha=4)({"points": pts})
    np.testing.assert_allclose(s.numpy(), region_rewards(point_boxes(pts.numpy(), 4), 100, 100))
    assert s[2] == 0


def test_vote_boxes_prefers_given_boxes_and_expands_points():
    pts = np.array([[10.0, 10.0], [20.0, 20.0]])
    boxes = np.array([[0, 0, 4, 4], [np.nan] * 4])
    vb = vote_boxes(pts, boxes, alpha=6)
    assert vb.tolist() == [[0, 0, 4, 4], [17, 17, 23, 23]]


def test_bad_input():
    with pytest.raises(MmttsError, match="K = 0"):
        consensus(np.zeros((0, 4)), 10, 10)
    with pytest.raises(MmttsError, match="K = 0"):
        region_rewards(np.zeros((0, 4)), 10, 10)
    with pytest.raises(MmttsError, match="alpha"):
        point_boxes([[1, 1]], 0)
    with pytest.raises(MmttsError, match="grid size"):
        consensus(np.zeros((1, 4)), 0, 10)
    with pytest.raises(MmttsError, match=r"\(K, 4\)"):
        consensus(np.zeros((3, 3)), 10, 10)
    # boxes outside the image, zero-area boxes and NaN rows are missing votes, not errors
    b = np.array([[20, 20, 30, 30], [5, 5, 5, 9], [3, 3, 8, 3], [np.nan, 0, 1, 1], [-9, -9, -1, -1]])
    for f in (consensus, consensus_reference):
        c = f(b, 10, 10)
        assert c.point is None and c.votes == 0 and c.samples == 5
    assert region_rewards(b, 10, 10).tolist() == [0.0] * 5
    # a box partly outside is clipped to the image
    c = consensus(np.array([[-5, -5, 3, 4]]), 10, 10)
    assert c.region == (0, 0, 3, 4) and c.votes == 1


def test_malformed_answers_are_refused_naming_the_argument_what_it_needs_and_what_came():
    good = np.array([[10.0, 10.0], [12.0, 11.0]])
    cases = [  # (call, words the message must hold)
        (lambda: point_boxes(np.zeros((5, 3)), 50), ["points", "(K, 2)", "(5, 3)"]),
        (lambda: point_boxes(np.zeros(4), 50), ["points", "(K, 2)", "(4,)"]),
        (lambda: point_boxes(np.array([["a", "b"]]), 50), ["points", "real numbers", "<U1"]),
        (lambda: point_boxes(np.array([[1 + 2j, 3]]), 50), ["points", "complex"]),
        (lambda: point_boxes([[1, 2], [3]], 50), ["points", "(K, 2)", "different lengths"]),
        (lambda: point_boxes(torch.ones(2, 2, dtype=torch.bool), 50), ["points", "torch.bool"]),
        (lambda: point_boxes([[np.inf, 3.0]], 50), ["points", "infinite", "NaN"]),
        (lambda: consensus(np.zeros((5, 3)), 10, 10), ["boxes", "(K, 4)", "(5, 3)"]),
        (lambda: consensus([[1, 2, 3, 4], [1, 2]], 10, 10), ["boxes", "(K, 4)", "different lengths"]),
        (lambda: region_rewards(torch.tensor(3.0), 10, 10), ["boxes", "(K, 4)", "()"]),
        (lambda: vote_boxes(good, np.zeros((3, 4))), ["points (2 rows)", "boxes (3 rows)"]),
        (lambda: consensus(point_boxes(good, 5), float("nan"), 10), ["grid size", "nan"]),
        (lambda: consensus(point_boxes(good, 5), "640", 10), ["grid size", "'640'"]),
        (lambda: point_boxes(good, float("inf")), ["alpha=inf"]),
        (lambda: RegionConsistency(10, 10).score({"points": np.zeros((5, 3))}), ["points", "(5, 3)"]),
    ]
    for call, words in cases:
        with pytest.raises(MmttsError) as err:
            call()
        for w in words:
            assert w in str(err.value), (w, str(err.value))
    # accepted as given: integer and float32 arrays, bfloat16 tensors, lists; NaN rows are missing answers
    want = consensus(point_boxes(good, 5), 40, 40)
    for same in (good.astype(np.int64), good.astype(np.float32), torch.tensor(good).bfloat16(), good.tolist()):
        assert consensus(point_boxes(same, 5), 40, 40) == want
    c = consensus(point_boxes(np.vstack([good, [np.nan, np.nan]]), 5), 40, 40)
    assert c.votes == 2 and c.samples == 3 and c.point == want.point


def test_region_vote_strategy_refuses_malformed_points_from_its_process():
    from mmtts.core.process import Process
    from mmtts.core.state import State
    import mmtts

    class Bad(Process):
        num_stages, nfe_per_stage, extent = 1, 1, (100, 100)

        def init(self, streams, first_index=0):
            return State.fresh({"x": torch.zeros(len(streams), 1)}, streams, first_index)

        def step(self, state):
            return State(state.data, state.stage + 1, state.streams, state.ids, state.parents, state.origin,
                         state.meta)

        def finish(self, state):
            return {"points": torch.zeros(len(state), 3)}

    with pytest.raises(MmttsError, match=r"points must have shape \(K, 2\).*\(5, 3\)"):
        mmtts.search(Bad(), None, "region-vote", budget=5, seed=0, n=5)
