"""Element proposals and snapped voting: answers snapped to the element under them before GUI-RC votes."""

import numpy as np
import pytest
import torch
from PIL import Image

import mmtts
from mmtts.core.errors import MmttsError, ProcessError
from mmtts.modalities.gui import ClickProcess, ElementBoxNet
from mmtts.modalities.gui.elements import DetectedElements, ElementList
from mmtts.modalities.gui.model import boxes_at
from mmtts.strategies.region_vote import snapped_vote_boxes, vote_boxes

pytestmark = pytest.mark.usefixtures("single_thread")

#: two stacked elements and a small one inside the first
ELEMENTS = np.array([[0.0, 0.0, 100.0, 40.0], [0.0, 40.0, 100.0, 80.0], [70.0, 5.0, 90.0, 15.0]])


class FixedAnswers:
    """A sampler whose i-th answer is ``texts[i % len(texts)]``, whatever the seed."""

    space = "pixel"

    def __init__(self, texts):
        self.texts, self.calls = list(texts), 0

    def sample(self, image, instruction, seeds, temperature):
        out = [self.texts[(self.calls + j) % len(self.texts)] for j in range(len(seeds))]
        self.calls += len(seeds)
        return out


def test_element_list_gives_the_smallest_element_holding_each_point():
    el = ElementList(ELEMENTS)
    pts = np.array([[10.0, 10.0], [80.0, 10.0], [50.0, 60.0], [100.0, 40.0], [150.0, 10.0], [np.nan, np.nan]])
    got = el.boxes_at(pts)
    np.testing.assert_array_equal(got[:4], ELEMENTS[[0, 2, 1, 0]])  # edges belong to the box (the first, smaller)
    assert np.isnan(got[4:]).all()                                    # outside every element, or no answer
    assert el.index_at(pts).tolist() == [0, 2, 1, 0, -1, -1]
    snapped = el.snap(pts)
    np.testing.assert_array_equal(snapped[:4], [[50, 20], [80, 10], [50, 60], [50, 20]])
    np.testing.assert_array_equal(snapped[4], pts[4])                 # unknown: the point stays
    with pytest.raises(MmttsError, match="x2 >= x1"):
        ElementList([[10, 0, 5, 5]])
    with pytest.raises(MmttsError, match="shape"):
        ElementList([[0, 0, 5]])


def test_detected_elements_read_the_box_of_the_cell_under_each_point():
    torch.manual_seed(0)
    net = ElementBoxNet(width=8).eval()
    image = Image.new("RGB", (640, 360), (200, 210, 220))
    det = DetectedElements(net, image, (1280, 720))
    cols, rows = net.cells
    pts = np.array([[0.0, 0.0], [640.0, 360.0], [1279.9, 719.9], [1280.0, 720.0], [np.nan, 3.0]])
    got = det.boxes_at(pts)
    col = np.minimum((pts[:4, 0] / 1280 * cols).astype(int), cols - 1)
    row = np.minimum((pts[:4, 1] / 720 * rows).astype(int), rows - 1)
    want = boxes_at(det.extents, torch.from_numpy(row * cols + col)[None])[0].numpy() * [1280, 720, 1280, 720]
    np.testing.assert_allclose(got[:4], want)
    assert np.isnan(got[4]).all()
    assert (got[:4, 2:] >= got[:4, :2]).all()


def test_click_process_records_the_element_under_each_answer():
    el = ElementList(ELEMENTS)
    proc = ClickProcess(FixedAnswers(["(10,10)", "[60,50,80,70]", "nothing"]), Image.new("RGB", (100, 80)), "x",
                        (100, 80), elements=el)
    out = mmtts.search(proc, None, "region-vote", budget=3, n=3, seed=0, snap=True).population
    np.testing.assert_array_equal(out["elements"].numpy()[:2], ELEMENTS[[0, 1]])  # a box answer by its centre
    assert torch.isnan(out["elements"][2]).all()
    with pytest.raises(ProcessError, match="elements must be ElementProposals"):
        ClickProcess(FixedAnswers(["(1,1)"]), Image.new("RGB", (10, 10)), "x", (10, 10), elements=ELEMENTS)


def test_snapped_vote_counts_elements_not_pixels():
    # three answers spread over the top element, two close together on the bottom one
    texts = ["(10,10)", "(90,30)", "(50,22)", "(50,60)", "(52,61)"]
    image = Image.new("RGB", (100, 80))
    plain = ClickProcess(FixedAnswers(texts), image, "x", (100, 80), elements=ElementList(ELEMENTS))
    pixels = mmtts.search(plain, None, "region-vote", budget=5, n=5, seed=0, alpha=20)
    assert 40 <= pixels.outputs[0, 1] <= 80                       # the pixel vote: where two squares overlap
    snapped = ClickProcess(FixedAnswers(texts), image, "x", (100, 80), elements=ElementList(ELEMENTS))
    res = mmtts.search(snapped, None, "region-vote", budget=5, n=5, seed=0, alpha=20, snap=True)
    assert res.outputs[0].tolist() == [50.0, 20.0]                # the centre of the element most answers hold
    assert res.votes.tolist() == [3 / 5]


def test_snapping_reduces_to_the_plain_vote_where_no_element_is_known():
    pts = np.array([[10.0, 10.0], [50.0, 60.0], [np.nan, np.nan]])
    boxes = np.full((3, 4), np.nan)
    np.testing.assert_array_equal(snapped_vote_boxes(pts, boxes, np.full((3, 4), np.nan), 20.0),
                                  vote_boxes(pts, boxes, 20.0))
    np.testing.assert_array_equal(snapped_vote_boxes(pts, boxes, None, 20.0), vote_boxes(pts, boxes, 20.0))
    with pytest.raises(MmttsError, match="2 element boxes for 3 samples"):
        snapped_vote_boxes(pts, boxes, np.zeros((2, 4)), 20.0)


def test_snapping_needs_elements_and_a_boolean():
    proc = ClickProcess(FixedAnswers(["(1,1)"]), Image.new("RGB", (10, 10)), "x", (10, 10))
    sampler = proc.sampler
    with pytest.raises(MmttsError, match="has no elements"):
        mmtts.search(proc, None, "region-vote", budget=4, n=4, seed=0, snap=True)
    assert sampler.calls == 0                                     # refused before sampling
    with pytest.raises(MmttsError, match="snap='yes'"):
        mmtts.search(proc, None, "region-vote", budget=4, n=4, seed=0, snap="yes")
