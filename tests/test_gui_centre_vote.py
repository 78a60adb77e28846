"""vlm_vote_bounds.py's point votes (every answer voted as a click on its point) and its paired intervals."""

import numpy as np
import pytest

from mmtts.bench import paired_comparison
from mmtts.strategies.region_vote import consensus, point_boxes, vote_boxes

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def click_run(load_script, tmp_path_factory):
    """The script on the quick click model over two seeds (its model trains once for the module)."""
    mod = load_script("benchmarks/gui/vlm_vote_bounds.py")
    tmp = tmp_path_factory.mktemp("centre-vote")
    res = mod.main(["--quick", "--seeds", "0", "1", "--screens", "2", "--samples", "64",
                    "--cache", str(tmp / "cache"), "--out", str(tmp / "out")])
    return mod, res, tmp / "out"


def test_click_vote_at_50_px_is_the_region_vote_of_clicks(click_run):
    mod, res, _ = click_run
    assert 50 in mod.ALPHAS
    for t in mod.TEMPERATURES:
        r = res[f"T={t:g}"]
        for k in mod.VOTES:
            # clicks carry no box, so GUI-RC's vote and the point vote at its alpha are one aggregation
            assert r[f"point_a50_K{k}_acc"] == r[f"vote_K{k}_acc"]
            assert r[f"point_a50_K{k}_on_mode"] == r[f"vote_K{k}_on_mode"]
            assert r[f"point_a50_K{k}_off_element"] == r[f"vote_K{k}_off_element"]
            assert res["per_seed_acc"][f"T={t:g}/point_a50_{k}"] == res["per_seed_acc"][f"T={t:g}/vote{k}"]
            for m in mod.AGGREGATIONS:
                on, off = r[mod.result_key(m, k) + "_on_mode"], r[mod.result_key(m, k) + "_off_element"]
                assert on >= 0 and off >= 0 and on + off <= 1  # an answer on the mode element is on an element
        assert 0 <= r["samples_off_element"] <= 1


def test_per_seed_accuracies_pool_to_the_totals_and_give_the_paired_intervals(click_run):
    mod, res, out = click_run
    per_seed = res["per_seed_acc"]
    assert len(per_seed["greedy"]) == 2 and np.mean(per_seed["greedy"]) == pytest.approx(res["greedy_acc"])
    for t in mod.TEMPERATURES:
        r = res[f"T={t:g}"]
        assert np.mean(per_seed[f"T={t:g}/mode"]) == pytest.approx(r["mode_acc"])  # equal seed sizes
        for a in mod.ALPHAS:
            key = f"T={t:g}/point_a{a}_64"
            assert np.mean(per_seed[key]) == pytest.approx(r[f"point_a{a}_K64_acc"])
            assert res["paired_to_greedy"][key] == paired_comparison(per_seed[key], per_seed["greedy"])
    text = (out / "vlm_vote_bounds.md").read_text()
    assert "K = 64 - greedy" in text and "click vote, alpha = 20 px" in text and "centre vote" not in text


def test_box_model_votes_its_centres_as_clicks(load_script, tmp_path):
    mod = load_script("benchmarks/gui/vlm_vote_bounds.py")
    res = mod.main(["--answer", "box", "--quick", "--seeds", "0", "--screens", "1", "--samples", "64",
                    "--cache", str(tmp_path / "cache"), "--out", str(tmp_path)])
    text = (tmp_path / "vlm_vote_bounds_box.md").read_text()
    assert "centre vote, alpha = 80 px" in text and "boxes as they are" in text
    assert set(res["T=0.5"]) >= {f"point_a{a}_K{k}_acc" for a in mod.ALPHAS for k in mod.VOTES}


def test_a_centre_vote_is_the_click_vote_of_the_centres():
    # what the script votes for a box answer: the alpha-square of its parsed point, the box's centre
    boxes = np.array([[100, 100, 140, 120], [104, 98, 150, 126], [300, 40, 420, 60], [96, 102, 136, 118]], float)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    cast = vote_boxes(centres, None, 35)
    np.testing.assert_array_equal(cast, point_boxes(centres, 35))
    c = consensus(cast, 640, 360)
    assert c.max_vote == 3 and 100 <= c.point[0] <= 140 and 100 <= c.point[1] <= 120
    # the same answers voting as boxes find a different region: where the three boxes overlap
    assert consensus(vote_boxes(centres, boxes, 35), 640, 360).region == (104, 102, 136, 118)
