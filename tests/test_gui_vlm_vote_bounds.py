"""benchmarks/gui/vlm_vote_bounds.py on the quick VLM: output files, consistent counts, determinism."""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("single_thread")


def test_vlm_vote_bounds_quick(load_script, tmp_path):
    mod = load_script("benchmarks/gui/vlm_vote_bounds.py")
    argv = ["--quick", "--seeds", "0", "--screens", "2", "--samples", "64", "--cache", str(tmp_path / "cache"),
            "--out", str(tmp_path / "a")]
    res = mod.main(argv)
    assert res["n"] == 6 and 0 <= res["greedy_acc"] <= 1
    for t in mod.TEMPERATURES:
        r = res[f"T={t:g}"]
        # greedy either lands on the mode or is counted as a disagreement, never both
        assert round(r["greedy_on_mode"] * res["n"]) + r["disagreements"] == res["n"]
        assert r["greedy_right_when_disagree"] <= r["disagreements"] >= r["mode_right_when_disagree"]
        assert 0 <= r["parse_rate"] <= 1
    assert json.loads((tmp_path / "a" / "vlm_vote_bounds.json").read_text())["n"] == 6
    assert "mode accuracy" in (tmp_path / "a" / "vlm_vote_bounds.md").read_text()
    assert len(res["per_seed_acc"]["greedy"]) == 1 and res["per_seed_acc"]["greedy"][0] == res["greedy_acc"]
    for t in mod.TEMPERATURES:  # the pooled accuracies are the per-seed ones over one seed
        assert res["per_seed_acc"][f"T={t:g}/overlap64"][0] == res[f"T={t:g}"]["overlap_K64_acc"]
    again = mod.main(argv[:-1] + [str(tmp_path / "b")])
    assert all(again[k] == res[k] for k in res if k.startswith("T=") or k.endswith("acc"))


def test_vlm_vote_bounds_box_model(load_script, tmp_path):
    mod = load_script("benchmarks/gui/vlm_vote_bounds.py")
    res = mod.main(["--answer", "box", "--quick", "--seeds", "0", "--screens", "1", "--samples", "64",
                    "--cache", str(tmp_path / "cache"), "--out", str(tmp_path)])
    assert res["n"] == 3 and res["answer"] == "box"
    for t in mod.TEMPERATURES:
        r = res[f"T={t:g}"]
        assert round(r["greedy_on_mode"] * res["n"]) + r["disagreements"] == res["n"]
    assert "answering with boxes" in (tmp_path / "vlm_vote_bounds_box.md").read_text()
    assert not (tmp_path / "vlm_vote_bounds.md").exists()


def test_overlap_vote_answers_with_the_box_most_others_overlap(load_script):
    mod = load_script("benchmarks/gui/vlm_vote_bounds.py")
    nan = float("nan")
    boxes = np.array([[0, 0, 10, 10], [100, 100, 120, 110], [101, 100, 121, 110], [nan, nan, nan, nan],
                      [99, 101, 119, 111]], dtype=float)
    assert mod.overlap_vote(boxes).tolist() == [110.0, 105.0]  # the middle one of three overlapping boxes
    assert np.isnan(mod.overlap_vote(np.full((2, 4), nan))).all()  # nothing voted


def test_element_of_picks_the_smallest_box_holding_the_point(load_script):
    mod = load_script("benchmarks/gui/vlm_vote_bounds.py")
    boxes = [(0, 0, 100, 100), (10, 10, 20, 20), (50, 50, 60, 60)]
    assert mod.element_of(np.array([15.0, 15.0]), boxes) == 1
    assert mod.element_of(np.array([30.0, 30.0]), boxes) == 0
    assert mod.element_of(np.array([300.0, 30.0]), boxes) == -1
    assert mod.element_of(np.array([np.nan, 3.0]), boxes) == -1
