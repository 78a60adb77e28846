"""The small version of the image-search benchmark, end to end through the CLI."""

import json

import pytest

import mmtts
from mmtts.cli import main

pytest.importorskip("mlxtend")


def test_quick_image_search_benchmark(cache_dir, tmp_path):
    rc = main(["bench", "image-search", "--quick", "--seeds", "0", "1", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "image-search.json").read_text())
    methods = {"best-of-n", "zero-order", "paths", "evosearch", "particle-filter", "beam"}
    assert {r["method"] for r in res["rows"]} == methods
    assert res["budgets"] == [8, 24]
    for r in res["rows"]:
        m = r["metrics"]
        assert {"reward", "heldout", "diversity", "nfe", "wall_s", "model_s", "decode_s", "verifier_s"} <= set(m)
        assert m["nfe"] <= r["budget"]
        assert m["reward"] <= 0.0 and m["heldout"] <= 0.0  # the ceiling of both log-probability scores
        assert m["wall_s"] >= m["model_s"] + m["decode_s"] + m["verifier_s"] - 1e-5  # shares of one clock
    summary = res["summary"]
    assert "nfe_ratio_to_best_of_n_at_24/best-of-n" in summary
    assert summary["nfe_ratio_to_best_of_n_at_24/best-of-n"] <= 1.0
    assert summary["overhead_at_24/evosearch"] >= 1.0 and summary["overhead_wall_over_model_plus_verifier/beam"] >= 1.0
    # three cached models, reused by a second task object
    assert len(list(cache_dir.iterdir())) == 3
    task = mmtts.create_task("image-search", quick=True)
    keys = ("reward", "heldout", "diversity", "nfe")
    a, b = task.run("evosearch", "default", 24, 1), task.run("evosearch", "default", 24, 1)
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert len(list(cache_dir.iterdir())) == 3
