"""benchmarks/gui/vote_bounds.py on the quick models: output files, consistency of its counts, determinism."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gui" / "vote_bounds.py"

pytestmark = pytest.mark.usefixtures("single_thread")


def _module():
    spec = importlib.util.spec_from_file_location("vote_bounds", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_vote_bounds_quick(tmp_path):
    mod = _module()
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


def test_iou_and_inside():
    mod = _module()
    assert mod.iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert mod.iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0
    assert mod.inside((1, 1), (0, 0, 1, 1)) and not mod.inside((1.01, 1), (0, 0, 1, 1))
