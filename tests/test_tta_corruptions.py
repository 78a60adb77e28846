"""The corruption functions and the quick tta-corruptions benchmark."""

import json

import numpy as np
import pytest
import torch

import mmtts
from mmtts.cli import main
from mmtts.tasks import colored_digits as digits
from mmtts.tasks.corruptions import CIFAR, IMAGENET, NAMES, corrupt


@pytest.fixture(scope="module")
def clean():
    x, _ = digits.split("test")
    return digits.compose(x[:6], np.random.default_rng(0), "test")


def test_thirteen_cifar_c_types_with_their_severity_tables():
    assert len(NAMES) == 13 and len(set(NAMES)) == 13
    assert all(len(v) == 5 for v in CIFAR.values()) and all(len(v) == 5 for v in IMAGENET.values())
    assert CIFAR["gaussian_noise"][4] == 0.10 and IMAGENET["gaussian_noise"][4] == 0.38


@pytest.mark.parametrize("name", NAMES)
def test_each_corruption_is_seeded_bounded_and_grows_with_severity(name, clean):
    a = corrupt(clean, name, 5, np.random.default_rng(3))
    b = corrupt(clean, name, 5, np.random.default_rng(3))
    assert a.shape == clean.shape and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert np.allclose(a * 255, np.round(a * 255), atol=1e-3)  # 8-bit like the published files
    mild = np.abs(corrupt(clean, name, 1, np.random.default_rng(3)) - clean).mean()
    strong = np.abs(a - clean).mean()
    assert strong > 0.01
    if name != "elastic_transform":  # its CIFAR-10-C severity 1 has the largest affine jitter of the five
        assert strong > mild


def test_bad_corruption_requests_are_named(clean):
    with pytest.raises(ValueError, match="no corruption 'snow'"):
        corrupt(clean, "snow", 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="severity must be 1..5"):
        corrupt(clean, "contrast", 6, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        corrupt(clean[0], "contrast", 3, np.random.default_rng(0))


def test_coloured_digits_are_rgb_with_readable_digits(clean):
    assert clean.shape == (6, 32, 32, 3) and 0 <= clean.min() and clean.max() <= 1
    assert np.abs(clean[..., 0] - clean[..., 2]).mean() > 0.01  # colour, not grey
    tr, te = digits.split("train"), digits.split("test")
    assert len(tr[0]) == 4000 and len(te[0]) == 1000 and set(np.bincount(te[1])) != {0}


def test_quick_benchmark_through_the_cli(tmp_path, cache_dir):
    rc = main(["bench", "tta-corruptions", "--quick", "--seeds", "0", "1", "--out", str(tmp_path),
               "--methods", "source", "bn", "tent", "eata", "deyo"])
    assert rc == 0
    res = json.loads((tmp_path / "tta-corruptions.json").read_text())
    assert res["settings"] == ["reset/bs64", "continual/bs1"]
    rows = {(r["setting"], r["method"]): r for r in res["rows"]}
    assert len(rows) == 10
    for r in rows.values():
        for k in ("error", "ece", "ms_per_batch", "backward_per_sample", "peak_mb"):
            assert f"{k}_ci95" in r["metrics"] and np.isfinite(r["metrics"][k]), (r["method"], k)
    assert rows[("reset/bs64", "tent")]["metrics"]["backward_per_sample"] == 1.0
    assert rows[("reset/bs64", "bn")]["metrics"]["backward_per_sample"] == 0.0
    assert "model=gn" in rows[("continual/bs1", "tent")]["detail"]
    assert "window=64" in rows[("continual/bs1", "bn")]["detail"]
    assert (tmp_path / "tta-corruptions.md").exists() and (tmp_path / "tta-corruptions.png").exists()


def test_same_seed_same_result_and_bn_matches_the_reference_math(cache_dir):
    task = mmtts.create_task("tta-corruptions", quick=True)
    a = task.run("deyo", "reset/bs64", None, 0)
    b = mmtts.create_task("tta-corruptions", quick=True).run("deyo", "reset/bs64", None, 0)
    assert {k: v for k, v in a.items() if k not in ("ms_per_batch", "peak_mb")} == \
        {k: v for k, v in b.items() if k not in ("ms_per_batch", "peak_mb")}
    # BN-adapt's errors equal a train-mode copy of the model run batch by batch
    model = task.model("bn").train()
    wrong = total = 0
    with torch.no_grad():
        for _, x, y in task.stream("reset/bs64", 0):
            for xb, yb in zip(x.split(64), y.split(64)):
                wrong += int((model(xb).argmax(1) != yb).sum())
                total += len(yb)
    assert task.run("bn", "reset/bs64", None, 0)["error"] == pytest.approx(wrong / total)


def test_bad_options_are_named(cache_dir):
    with pytest.raises(mmtts.MmttsError, match="unknown corruption.*'fros'"):
        mmtts.create_task("tta-corruptions", corruptions="fros")
    with pytest.raises(mmtts.MmttsError, match="no setting"):
        mmtts.create_task("tta-corruptions", quick=True).run("tent", "continual/bs7", None, 0)
