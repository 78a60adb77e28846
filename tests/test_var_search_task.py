"""The small version of the var-search benchmark, end to end through the CLI."""

import json

import pytest

import mmtts
import mmtts.strategies.tts_var  # noqa: F401  (registers tts-var)
import mmtts.tasks.var_search  # noqa: F401  (registers var-search)
from mmtts.cli import main

pytest.importorskip("mlxtend")
pytest.importorskip("sklearn")


def test_quick_var_search_benchmark(cache_dir, tmp_path):
    rc = main(["bench", "var-search", "--quick", "--seeds", "0", "1", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "var-search.json").read_text())
    methods = {"best-of-n", "tts-var", "tts-var-diff", "tts-var-sum", "tts-var-max", "tts-var-topk", "beam",
               "particle-filter"}
    assert {r["method"] for r in res["rows"]} == methods
    assert res["budgets"] == [130, 390] and res["budget_unit"] == "tokens"
    for r in res["rows"]:
        m = r["metrics"]
        assert {"reward", "heldout", "diversity", "tokens", "nfe", "wall_s", "model_s", "decode_s",
                "verifier_s"} <= set(m)
        assert m["tokens"] <= r["budget"]
        assert m["nfe"] >= 6  # at least one candidate through the six scales
        assert m["reward"] <= 0.0 and m["heldout"] <= 0.0
        assert m["wall_s"] >= m["model_s"] + m["decode_s"] + m["verifier_s"] - 1e-5
    # at one sample's work every method runs exactly one candidate: the same one
    first = {r["method"]: r["per_seed"]["reward"] for r in res["rows"] if r["budget"] == 130}
    assert len({tuple(v) for v in first.values()}) == 1
    summary = res["summary"]
    assert summary["token_ratio_to_best_of_n_at_390/best-of-n"] <= 1.0
    assert (tmp_path / "var-search-samples.png").exists() and (tmp_path / "var-search.md").exists()
    assert len(list(cache_dir.iterdir())) == 4  # tokenizer, transformer and the two shared classifiers
    task = mmtts.create_task("var-search", quick=True)
    keys = ("reward", "heldout", "diversity", "tokens", "nfe")
    a, b = task.run("tts-var-max", "default", 390, 1), task.run("tts-var-max", "default", 390, 1)
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
