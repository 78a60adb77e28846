import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

import mmtts
from mmtts.bench import mean_ci95, paired_comparison, run_benchmark
from mmtts.cli import main
from mmtts.tasks.cache import ModelCache, config_hash


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mmtts.cli", *args], capture_output=True, text=True,
                          env={**__import__("os").environ, "MMTTS_PROGRESS": "0"})


def test_bench_toy_gmm_writes_results_with_the_shared_shape(tmp_path, capsys):
    rc = main(["bench", "toy-gmm", "--seeds", "0", "1", "2", "--budgets", "20", "80", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "toy-gmm.json").read_text())
    for key in ("task", "command", "created", "machine", "versions", "seeds", "rows"):
        assert key in res
    assert res["command"].startswith("mmtts bench toy-gmm")
    assert res["seeds"] == [0, 1, 2] and res["versions"]["torch"]
    methods = {r["method"] for r in res["rows"]}
    assert methods == {"best-of-n", "particle-filter", "beam"}
    row = res["rows"][0]
    assert set(row) >= {"method", "setting", "budget", "metrics"}
    assert {"reward", "reward_ci95", "log_density", "log_density_ci95"} <= set(row["metrics"])
    assert res["references"]["best-of-N, analytic E[max]"][0] == pytest.approx(
        mmtts.create_task("toy-gmm").reward.expected_best_of(mmtts.create_task("toy-gmm").mixture, 1))
    md = (tmp_path / "toy-gmm.md").read_text()
    assert "| default | particle-filter | 80 |" in md and "not significant" in md
    assert (tmp_path / "toy-gmm.png").stat().st_size > 10_000
    assert "toy-gmm" in capsys.readouterr().out


def test_same_seeds_give_identical_rows(tmp_path):
    task = mmtts.create_task("toy-gmm")
    a = run_benchmark(task, [0, 1], [20, 40])
    b = run_benchmark(mmtts.create_task("toy-gmm"), [0, 1], [20, 40])
    assert a["rows"] == b["rows"]
    c = run_benchmark(mmtts.create_task("toy-gmm"), [2, 3], [20, 40])
    assert a["rows"] != c["rows"]


def test_statistics_helpers():
    v = [1.0, 2.0, 4.0]
    m, h = mean_ci95(v)
    lo, hi = stats.t.interval(0.95, 2, loc=np.mean(v), scale=stats.sem(v))
    assert m == pytest.approx(np.mean(v)) and h == pytest.approx((hi - lo) / 2)
    m1, h1 = mean_ci95([3.0])
    assert m1 == 3.0 and np.isnan(h1)  # one seed: no interval
    c = paired_comparison([1.0, 2.0, 3.0], [0.0, 1.0, 2.1])
    assert c["significant"] and c["diff"] > 0
    c = paired_comparison([1.0, 2.0, 3.0], [1.5, 1.0, 3.2])
    assert not c["significant"]


@pytest.mark.parametrize("args, msg", [
    (["bench", "nope"], "unknown task 'nope'; valid task names: "),
    (["bench", "toy-gm"], "did you mean 'toy-gmm'"),
    (["bench", "toy-gmm", "--budgets", "0"], "must be positive whole numbers"),
    (["bench", "toy-gmm", "--budgets", "10"], "below the cost of one candidate"),
    (["bench", "toy-gmm", "--methods", "greedy"], "has no method 'greedy'"),
    (["bench", "toy-gmm", "--seeds", "1", "1"], "repeat a value"),
    (["bench", "toy-gmm", "--option", "colour=red"], "has no option(s) ['colour']"),
    (["tasks", "prepare", "nope"], "valid task names"),
])
def test_user_errors_are_one_clean_line(args, msg, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert msg in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_help_list_and_subprocess_entry_point():
    r = run_cli("--help")
    assert r.returncode == 0 and "bench" in r.stdout and "demo" in r.stdout and "equal budget" in r.stdout
    r = run_cli("list")
    assert r.returncode == 0
    line = next(x for x in r.stdout.splitlines() if x.startswith("strategies: "))
    assert {"beam", "best-of-n", "particle-filter"} <= set(line[len("strategies: "):].split(", "))
    assert "toy-quadratic" in r.stdout
    assert "tasks:" in r.stdout and "toy-gmm" in r.stdout
    r = run_cli("bench", "nope")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_registry_factories():
    assert {"best-of-n", "beam", "particle-filter"} <= set(mmtts.list_strategies())
    assert "toy-gmm" in mmtts.list_tasks()
    assert mmtts.create_strategy("particle-filter", lmbda=2.0).settings["lmbda"] == 2.0
    with pytest.raises(ValueError, match="unknown potential"):
        mmtts.create_strategy("particle-filter", potential="min")


def test_model_cache_trains_once_per_config(cache_dir):
    import torch
    calls = []

    def train():
        calls.append(1)
        return {"w": torch.arange(3.0)}

    cache = ModelCache()
    assert cache.root == cache_dir
    a = cache.load_or_train("m", {"k": 1}, train)
    b = cache.load_or_train("m", {"k": 1}, train)
    assert calls == [1] and torch.equal(a["w"], b["w"])
    cache.load_or_train("m", {"k": 2}, train)
    assert len(calls) == 2 and config_hash({"k": 1}) != config_hash({"k": 2})
    assert (cache.entry("m", {"k": 1}) / "config.json").exists()
    with pytest.raises(mmtts.core.MissingWeightsError, match="mmtts tasks prepare"):
        cache.load("m", {"k": 3})


def test_prepare_learned_toy_model_and_bench_with_it(cache_dir, tmp_path, capsys):
    assert main(["tasks", "prepare", "toy-gmm", "--quick", "--option", "model=learned"]) == 0
    assert "ready (toy-gmm-denoiser)" in capsys.readouterr().out
    entries = list(cache_dir.iterdir())
    assert len(entries) == 1 and (entries[0] / "model.safetensors").exists()
    task = mmtts.create_task("toy-gmm", quick=True, model="learned")
    res = run_benchmark(task, [0, 1], [20, 160], methods=["best-of-n", "particle-filter"])
    by = {(r["method"], r["budget"]): r["metrics"]["reward"] for r in res["rows"]}
    # a learned denoiser still gives search something to find
    assert by[("particle-filter", 160)] > by[("best-of-n", 20)]
    assert len(list(cache_dir.iterdir())) == 1  # reused, not retrained


def _strict_load(text: str):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_one_seed_writes_strict_json_and_shows_no_interval(tmp_path, capsys):
    assert main(["bench", "toy-gmm", "--seeds", "0", "--budgets", "20", "--out", str(tmp_path)]) == 0
    res = _strict_load((tmp_path / "toy-gmm.json").read_text())
    assert res["rows"][0]["metrics"]["reward_ci95"] is None
    assert all(c["p_value"] is None and c["verdict"] == "not significant" for c in res["comparisons"])
    md = (tmp_path / "toy-gmm.md").read_text()
    assert "± n/a" in md and "± 0 " not in md and "nan" not in md.lower()
    assert "± n/a" in capsys.readouterr().out


class _NeverRun(mmtts.tasks.Task):
    name = "never-run"
    methods = ("a",)
    baseline = "a"
    default_budgets = (1,)

    def prepare(self):
        raise AssertionError("the sweep started before --out was checked")

    def run(self, method, setting, budget, seed):
        raise AssertionError("the sweep started before --out was checked")


def test_out_is_checked_before_the_sweep(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(mmtts.MmttsError, match="is a file, not a directory"):
        run_benchmark(_NeverRun(), [0, 1], [1], out=not_a_dir)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not __import__("os").access(locked, __import__("os").W_OK):  # root may write anywhere
        with pytest.raises(mmtts.MmttsError, match="cannot write results"):
            run_benchmark(_NeverRun(), [0, 1], [1], out=locked / "sub")


def test_ctrl_c_at_any_point_exits_quietly(monkeypatch, capsys):
    import mmtts.cli as cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)  # as early as argument parsing, before torch loads
    assert cli.main(["list"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "mmtts: interrupted" and "Traceback" not in err


def test_cli_module_imports_no_torch_before_main():
    out = subprocess.run([sys.executable, "-c", "import sys, mmtts.cli; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_plot_leaves_out_a_metric_no_row_has(tmp_path):
    # a sweep where one metric is undefined everywhere (e.g. a per-adaptation-step time with no adapting method)
    from mmtts.bench import plot
    rows = [{"method": m, "setting": "s", "budget": b,
             "metrics": {"acc": 0.5, "acc_ci95": 0.1, "step_ms": float("nan"), "step_ms_ci95": float("nan")}}
            for m in ("a", "b") for b in (8, 16)]
    results = {"task": "t", "rows": rows, "settings": ["s"], "budget_unit": "samples", "primary_metric": "acc",
               "references": {}, "budgets": [8, 16], "seeds": [0, 1]}
    plot(results, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 0
