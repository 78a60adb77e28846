"""The published preset of GUI-RC voting and the GUI-RCPO reward against literal re-implementations.

The two ``literal_*`` functions below follow the published construction
step by step (``int()`` on every edge, clamping x1, y1 to 0 and x2, y2 to the
image, slice-adding into a full grid, labelling, a strict ``>`` over regions
in label order, the reward as votes over max vote times the slice's size),
so they are the yardstick for ``published=True``, not mmtts's own code.
Coordinates are non-negative with one decimal, as the published parser
reads them from text.
"""

import numpy as np
import pytest
import torch
from scipy.ndimage import find_objects, label

import mmtts
from mmtts.adapters.gui_rcpo import GUIRCPO, published_region_rewards
from mmtts.core.errors import MmttsError
from mmtts.core.process import Process
from mmtts.core.rng import Streams
from mmtts.core.state import State
from mmtts.modalities.gui.model import GroundingNet, tokenize
from mmtts.strategies.region_vote import (RegionConsistency, consensus, consensus_reference, point_boxes,
                                          region_rewards)


def literal_vote(boxes, w, h):
    """The published GUI-RC answer: the consensus centre (x, y), or None when nothing voted."""
    grid = np.zeros((h, w), dtype=np.int32)
    for box in boxes:
        x1, y1, x2, y2 = int(box[0]), int(box[1]), int(box[2]), int(box[3])
        x1, y1 = max(0, x1), max(0, y1)
        x2, y2 = min(w, x2), min(h, y2)
        grid[y1:y2, x1:x2] += 1
    top = grid.max()
    if top <= 0:
        return None
    labels, count = label(grid == top)
    best, centre = 0, None
    for i, slices in enumerate(find_objects(labels)):
        if slices is None:
            continue
        ys, xs = slices
        size = (labels == i + 1).sum()
        if size > best:
            best, centre = size, ((xs.start + xs.stop) / 2, (ys.start + ys.stop) / 2)
    return centre


def literal_reward(answers, w, h, expand, grow):
    """The published training reward of one prompt's answers ([x1, y1, x2, y2]; a click is [x, y, x, y])."""
    boxes = []
    grid = np.zeros((h, w), dtype=np.int32)
    for a in answers:
        if grow:      # the UI-TARS branch
            x1, y1, x2, y2 = int(a[0]) - expand, int(a[1]) - expand, int(a[2]) + expand, int(a[3]) + expand
        else:         # the Qwen branch
            x1, y1, x2, y2 = int(a[0]), int(a[1]), int(a[2]), int(a[3])
        x1, y1 = max(0, x1), max(0, y1)
        x2, y2 = min(w, x2), min(h, y2)
        boxes.append((x1, y1, x2, y2))
        grid[y1:y2, x1:x2] += 1
    top = grid.max()
    out = []
    for x1, y1, x2, y2 in boxes:
        region = grid[y1:y2, x1:x2]
        rh, rw = region.shape
        out.append(0 if rh == 0 or rw == 0 else region.sum() / (top * rh * rw))
    return np.array(out, dtype=np.float64)


def one_decimal(rng, lo, hi, size):
    return np.round(rng.uniform(lo, hi, size), 1)


def random_case(rng):
    """Points (as alpha-squares) or boxes with one-decimal coordinates, with thin boxes and duplicated ties."""
    w, h = (int(v) for v in rng.integers(8, 120, 2))
    k = int(rng.integers(1, 12))
    kind = rng.integers(4)
    if kind == 0:                                   # clicks, GUI-RC's 50 px squares scaled to the grid
        alpha = float(rng.choice([5.0, 9.0, 50.0]))
        return point_boxes(np.stack([one_decimal(rng, 0, w + 10, k), one_decimal(rng, 0, h + 10, k)], 1), alpha), w, h
    x1, y1 = one_decimal(rng, 0, w, k), one_decimal(rng, 0, h, k)
    b = np.stack([x1, y1, x1 + one_decimal(rng, 0, w / 2, k), y1 + one_decimal(rng, 0, h / 2, k)], 1)
    if kind == 1:                                   # thin boxes: many truncate to zero width or height
        thin = rng.random(k) < 0.5
        b[thin, 2] = np.floor(b[thin, 0]) + one_decimal(rng, 0.1, 0.9, int(thin.sum()))
        b[thin, 0] = np.floor(b[thin, 0]) + one_decimal(rng, 0.0, 0.1, int(thin.sum()))
        b[:, 2] = np.maximum(b[:, 2], b[:, 0])
    elif kind == 2:                                 # duplicated disjoint boxes: ties between equal regions
        b = np.tile(b[: max(1, k // 3)], (3, 1))
    return b, w, h


def test_published_vote_matches_the_literal_construction_on_fractional_coordinates():
    rng = np.random.default_rng(0)
    differ = none = 0
    for _ in range(1500):
        b, w, h = random_case(rng)
        want = literal_vote(b, w, h)
        got = consensus(b, w, h, published=True)
        assert got.point == want, (b.tolist(), w, h)
        assert consensus_reference(b, w, h, published=True).point == want
        none += want is None
        differ += consensus(b, w, h).point != want
    assert none > 20 and differ > 100   # the sweep holds "no answer" cases and cases where the default differs


def test_zero_width_after_truncation_gives_no_answer_only_under_the_published_preset():
    b = np.array([[10.2, 5.0, 10.8, 9.0]])           # int() makes x1 == x2 == 10
    assert literal_vote(b, 20, 20) is None
    assert consensus(b, 20, 20, published=True).point is None
    assert consensus(b, 20, 20).point == (10.5, 7.0)  # the default lets it cover the column it overlaps
    assert region_rewards(b, 20, 20, published=True).tolist() == [0.0]


def test_published_tie_break_is_the_first_region_in_label_order():
    # two disjoint boxes of equal truncated area: the one whose first pixel comes first in row-major order wins
    b = np.array([[30.7, 2.9, 40.2, 12.4], [5.5, 2.1, 15.9, 12.8]])
    assert literal_vote(b, 50, 20) == consensus(b, 50, 20, published=True).point == (10.0, 7.0)
    b = np.array([[30.7, 2.9, 40.2, 12.4], [5.5, 3.1, 15.9, 13.8]])   # now the right box starts a row higher
    assert literal_vote(b, 50, 20) == consensus(b, 50, 20, published=True).point == (35.0, 7.0)


def test_published_region_rewards_match_the_literal_reward():
    rng = np.random.default_rng(1)
    for _ in range(400):
        b, w, h = random_case(rng)
        want = literal_reward(b, w, h, 0, grow=False)
        np.testing.assert_array_equal(region_rewards(b, w, h, published=True), want)


@pytest.mark.parametrize("branch", ["ui-tars", "qwen"])
def test_published_rcpo_reward_of_each_branch_matches_the_literal_reward(branch):
    rng = np.random.default_rng(2)
    for _ in range(150):
        sizes = {0: (int(rng.integers(200, 900)), int(rng.integers(200, 900))), 7: (640, 360)}
        k = int(rng.integers(2, 10))
        groups = np.repeat([0, 7], k)
        pts = np.stack([one_decimal(rng, 0, 700, 2 * k), one_decimal(rng, 0, 700, 2 * k)], 1)
        boxes = np.full((2 * k, 4), np.nan)
        is_box = rng.random(2 * k) < 0.5
        boxes[is_box, :2] = pts[is_box]
        boxes[is_box, 2:] = pts[is_box] + one_decimal(rng, 0, 150, (int(is_box.sum()), 2))
        got = published_region_rewards(pts, groups, sizes, boxes=boxes, branch=branch, point_expand_size=100)
        for g in (0, 7):
            m = groups == g
            answers = [list(bx) if ib else [p[0], p[1], p[0], p[1]] for p, bx, ib in zip(pts[m], boxes[m], is_box[m])]
            want = literal_reward(answers, *sizes[g], expand=100, grow=branch == "ui-tars")
            np.testing.assert_array_equal(got[m], want)


def test_published_rcpo_expands_clicks_by_100_px_per_side_and_qwen_not_at_all():
    pts = np.array([[300.7, 400.2], [450.3, 400.9]])           # 150 px apart
    groups, sizes = np.zeros(2), {0: (1000, 1000)}
    # ui-tars: 200 px squares from the truncated clicks overlap in a 50 x 200 strip voted twice
    tars = published_region_rewards(pts, groups, sizes, branch="ui-tars", point_expand_size=100)
    np.testing.assert_allclose(tars, (200 * 200 + 50 * 200) / (2 * 200 * 200), rtol=0, atol=1e-15)
    # the same clicks as mmtts's default (alpha = 50, +-25 px) do not overlap: each is its own consensus
    assert region_rewards(point_boxes(pts, 50), 1000, 1000).tolist() == [1.0, 1.0]
    # qwen: a click is an empty box, casts no vote and earns 0
    assert published_region_rewards(pts, groups, sizes, branch="qwen").tolist() == [0.0, 0.0]
    # ui-tars grows box answers too: a 10 x 10 box becomes 210 x 210
    box = np.array([[100.0, 100.0, 110.0, 110.0], [np.nan] * 4])
    far = np.array([[0.0, 0.0], [900.0, 900.0]])
    r = published_region_rewards(far, groups, sizes, boxes=box, branch="ui-tars")
    np.testing.assert_array_equal(r, [1.0, 1.0])
    r = published_region_rewards(np.array([[0.0, 0.0], [205.0, 105.0]]), groups, sizes, boxes=box, branch="ui-tars")
    assert r[0] < 1 and r[1] < 1                        # the grown box now overlaps the click 95 px to its right


def test_published_rcpo_refuses_bad_settings():
    net = GroundingNet(width=8)
    with pytest.raises(MmttsError, match="branch="):
        GUIRCPO(net, published=True, branch="intern")
    with pytest.raises(MmttsError, match="point_expand_size"):
        GUIRCPO(net, published=True, point_expand_size=2.5)
    with pytest.raises(MmttsError, match="either reward= or published=True"):
        GUIRCPO(net, published=True, reward=lambda *a, **k: np.zeros(1))
    with pytest.raises(MmttsError, match=r"points \(0 rows\) and boxes \(1 rows\)"):
        published_region_rewards(np.zeros((0, 2)), np.zeros(0), {}, boxes=np.zeros((1, 4)))
    with pytest.raises(MmttsError, match=r"points must have shape \(K, 2\).*\(5, 3\)"):
        published_region_rewards(np.zeros((5, 3)), np.zeros(5), {0: (10, 10)})


def test_published_rcpo_adapter_steps_on_the_published_reward():
    torch.manual_seed(0)
    seen = {}

    def spy(points, groups, sizes, alpha, **kw):
        seen["args"] = (points, groups, sizes)
        return np.zeros(len(points))

    batch = {"images": torch.rand(2, 3, 112, 192, generator=torch.Generator().manual_seed(0)),
             "tokens": tokenize(["close the window", "click the last file"]),
             "sizes": torch.tensor([[1920, 1080], [1280, 720]]), "ids": torch.arange(2)}
    GUIRCPO(GroundingNet(width=8), n=8, seed=3, reward=spy)(batch)
    adapter = GUIRCPO(GroundingNet(width=8), n=8, seed=3, published=True)
    points, groups, sizes = seen["args"]
    assert adapter.reward(points, groups, sizes, 50.0).tolist() == \
        published_region_rewards(points, groups, sizes, branch="ui-tars", point_expand_size=100).tolist()
    adapter(batch)
    assert np.isfinite(adapter.last["reward"]) and adapter.published


def test_region_vote_strategy_and_verifier_take_the_published_preset():
    class ThinBoxes(Process):
        """n boxes 0.5 px wide that all truncate to zero width."""
        num_stages, nfe_per_stage, extent = 1, 1, (40, 30)

        def init(self, streams, first_index=0):
            return State.fresh({"x": torch.zeros(len(streams), 2, dtype=torch.float64)}, streams, first_index)

        def step(self, state):
            pts = torch.tensor([[10.2 + (i % 3) * 0.1, 5.0] for i in range(len(state))], dtype=torch.float64)
            return State({"x": pts}, state.stage + 1, state.streams, state.ids, state.parents, state.origin,
                         state.meta)

        def finish(self, state):
            x = state.data["x"]
            return {"boxes": torch.cat([x, x + torch.tensor([0.5, 4.0], dtype=torch.float64)], 1)}

    proc = ThinBoxes()
    boxes = proc.finish(proc.step(proc.init(Streams.spawn(0, 6))))["boxes"].numpy()
    assert literal_vote(boxes, 40, 30) is None
    pub = mmtts.search(proc, None, "region-vote", budget=6, seed=0, n=6, published=True)
    assert torch.isnan(pub.outputs).all() and pub.votes.tolist() == [0.0] and pub.extra["missing"] == 6
    default = mmtts.search(proc, None, "region-vote", budget=6, seed=0, n=6)
    assert default.outputs[0].tolist() == [10.5, 7.0] and default.votes.tolist() == [1.0]
    wide = boxes + np.array([0, 0, 1.0, 0])
    score = RegionConsistency(40, 30, published=True).score({"boxes": torch.from_numpy(wide)})
    np.testing.assert_array_equal(score.numpy(), literal_reward(wide, 40, 30, 0, grow=False))
