"""benchmarks/gui/snap_bounds.py on the quick VLMs: files, the element-group vote, determinism."""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("single_thread")


def test_group_vote_answers_the_element_most_boxes_agree_on(load_script):
    mod = load_script("benchmarks/gui/snap_bounds.py")
    a, b = [0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]
    boxes = np.array([a, b, [0.0, 0.0, 10.0, 9.0], [np.nan] * 4, [0.5, 0.0, 10.0, 10.0]])
    assert mod.group_vote(boxes).tolist() == [5.0, 5.0]             # three boxes on a, one on b
    assert np.isnan(mod.group_vote(np.full((2, 4), np.nan))).all()


def test_snap_bounds_quick(load_script, tmp_path):
    mod = load_script("benchmarks/gui/snap_bounds.py")
    argv = ["--quick", "--seeds", "0", "1", "--screens", "1", "--samples", "64", "--cache", str(tmp_path / "c"),
            "--out", str(tmp_path / "a")]
    res = mod.main(argv)
    assert res["n"] == 6 and len(res["per_seed_acc"]["greedy"]) == 2
    assert all(0 <= v <= 1 for vals in res["per_seed_acc"].values() for v in vals)
    assert set(res["paired"]) == {"greedy", "greedy_snapped"} and "T=0.5/snap64" in res["paired"]["greedy"]
    saved = json.loads((tmp_path / "a" / "snap_bounds_box.json").read_text())
    assert saved["per_seed_acc"] == res["per_seed_acc"]
    assert "GUI-RC, snapped" in (tmp_path / "a" / "snap_bounds_box.md").read_text()
    again = mod.main(argv[:-1] + [str(tmp_path / "b")])
    assert again["per_seed_acc"] == res["per_seed_acc"]
