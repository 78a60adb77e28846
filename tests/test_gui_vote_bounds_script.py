"""benchmarks/gui/vote_bounds.py on the quick models: output files, consistency of its counts, determinism."""

import json

import pytest

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def mod(load_script):
    return load_script("benchmarks/gui/vote_bounds.py")


def test_vote_bounds_quick(mod, tmp_path):
    argv = ["--quick", "--seeds", "0", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "a")]
    report = mod.main(argv)
    for setting, r in report["results"].items():
        acc, n = r["accuracy"], r["instructions"]
        assert n == 24 and all(0 <= v <= 1 for v in acc.values()) and 0 < r["box_iou_mean"] <= 1
        # the disagreement counts are the difference between the first vote's and box greedy's hits
        t, k = mod.VOTES[0]
        d = r["disagreements"]
        assert d["vote right"] - d["greedy right"] == round(n * (acc[f"vote T={t:g} K={k}, learned boxes"]
                                                                 - acc["greedy, learned box"]))
        assert d["wrong vote between elements"] <= d["greedy right"]
    text = (tmp_path / "a" / "vote_bounds.md").read_text()
    assert "--quick --seeds 0" in text and "mass oracle" in text
    again = mod.main(argv[:-1] + [str(tmp_path / "b")])
    assert again["results"] == report["results"]
    saved = json.loads((tmp_path / "a" / "vote_bounds.json").read_text())
    assert saved["results"] == report["results"]


def test_iou_and_inside(mod):
    assert mod.iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert mod.iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0
    assert mod.inside((1, 1), (0, 0, 1, 1)) and not mod.inside((1.01, 1), (0, 0, 1, 1))
