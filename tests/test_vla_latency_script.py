"""benchmarks/vla/latency.py at a tiny size: output structure, and one batched policy call per K = 16 step."""

import json

import pytest
import torch

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from mmtts.modalities.vla import ActionVerifier, GaussianPolicy  # noqa: E402
from mmtts.tasks.vla_mujoco import STATE_DIM, VERIFIER_CONFIG, GaussianMLP, make_scorer  # noqa: E402


@pytest.fixture(scope="module")
def latency(load_script):
    return load_script("benchmarks/vla/latency.py")


def test_wide_trunk_costs_more_but_acts_exactly_as_the_policy(latency):
    torch.manual_seed(0)
    base = GaussianMLP(hidden=16).eval()
    wide = latency.WideTrunk(base, 64).eval()
    batch = {"observation.state": torch.randn(3, STATE_DIM)}
    a = GaussianPolicy(base, STATE_DIM).sample_actions(batch, 8, torch.Generator().manual_seed(1))
    b = GaussianPolicy(wide, STATE_DIM).sample_actions(batch, 8, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert sum(p.numel() for p in wide.parameters()) > sum(p.numel() for p in base.parameters())


def test_measure_counts_one_policy_call_per_step_at_k16_and_writes_outputs(latency, tmp_path):
    torch.manual_seed(0)
    base = GaussianMLP(hidden=16)
    policies = [{"label": "small", "width": 0, "module": base},
                {"label": "small + trunk 32", "width": 32, "module": latency.WideTrunk(base, 32)}]
    verifier = ActionVerifier(make_scorer({**VERIFIER_CONFIG, "hidden": 16}).eval())
    threads = torch.get_num_threads()
    rows = latency.measure(policies, verifier, k=16, samples=8, episodes=1, repeats=2, forward_calls=10)
    assert torch.get_num_threads() == threads  # one thread only while measuring
    assert [r["label"] for r in rows] == ["small", "small + trunk 32"]
    for r in rows:
        c = r["calls"]
        assert c["k16"]["steps"] == c["k1"]["steps"] == c["one_by_one"]["steps"] == 50
        # N = 8 samples and K = 16 candidates: still one policy forward per step, one row per sample
        assert c["k16"]["policy_calls_per_step"] == 1 and c["k16"]["policy_rows_per_call"] == 8
        assert c["k1"]["policy_calls_per_step"] == 1 and c["k1"]["verifier_calls_per_step"] == 0
        # all candidates scored in one verifier call (fewer rows only where clipping made duplicates)
        assert c["k16"]["verifier_calls_per_step"] == 1 and 1 < c["k16"]["verifier_rows_per_call"] <= 16
        # the unbatched reference really runs the policy and the verifier once per candidate
        assert c["one_by_one"]["policy_calls_per_step"] == 16
        assert c["one_by_one"]["verifier_calls_per_step"] == 16 and c["one_by_one"]["verifier_rows_per_call"] == 1
        for key in ("k1_ms", "k16_ms", "one_by_one_ms", "ratio", "one_by_one_ratio", "extra_ms"):
            s = r[key]
            assert len(s["values"]) == 2 and s["min"] <= s["median"] <= s["max"] and s["min"] > 0
        assert r["forward_ms"] > 0
        assert r["one_by_one_ms"]["median"] > r["k1_ms"]["median"]
    result = {"command": "python benchmarks/vla/latency.py --tiny", "created": "now",
              "machine": {"platform": "test", "cpu_count": 1}, "versions": {"torch": torch.__version__},
              "settings": {"k": 16, "samples": 8, "episodes": 1, "repeats": 2, "seed": 0},
              "rows": rows, "summary": latency.summarise(rows)}
    text = latency.write_outputs(result, tmp_path)
    saved = json.loads((tmp_path / "latency.json").read_text())
    assert saved["rows"][1]["calls"]["k16"]["policy_calls_per_step"] == 1
    assert (tmp_path / "latency.png").stat().st_size > 0
    assert "python benchmarks/vla/latency.py --tiny" in text and "trained + trunk" not in text
    assert text.count("\n| small") == 2


def test_crossing_interpolates_where_the_ratio_falls_to_two(latency):
    rows = [{"forward_ms": f, "ratio": {"median": r}} for f, r in ((0.1, 3.0), (1.0, 1.5), (10.0, 1.05))]
    x = latency.crossing(rows)
    assert 0.1 < x < 1.0
    assert latency.crossing(rows[1:]) is None


def test_step_time_script_times_both_step_sizes(load_script, capsys):
    step_time = load_script("benchmarks/vla/step_time.py")
    out = step_time.main(["--rounds", "2", "--steps", "5"])
    assert set(out) == {"k1_ms", "k16_ms"} and all(len(v) == 2 and min(v) > 0 for v in out.values())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
