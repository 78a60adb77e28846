"""The gui-grounding-vlm benchmark in its quick version: every method on the VLM, determinism, labels unread."""

import numpy as np
import pytest
import torch

from mmtts.bench import run_benchmark
from mmtts.core.errors import MmttsError
from mmtts.modalities.gui.vlm import QUICK_VLM_CONFIG, VLM_CONFIG
from mmtts.tasks.cache import ModelCache
from mmtts.tasks.gui_grounding import GUIGrounding, GUIGroundingVLM

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One quick VLM for the module (it trains in seconds)."""
    return ModelCache(tmp_path_factory.mktemp("gui-vlm-cache"))


def test_quick_benchmark_runs_every_method(cache, tmp_path):
    task = GUIGroundingVLM(cache=cache, quick=True, screens=4)
    res = run_benchmark(task, [0, 1], list(task.quick_budgets), out=tmp_path)
    assert {r["method"] for r in res["rows"]} == {"greedy", "gui-rc", "gui-rcpo", "gui-rcpo+rc"}
    assert {r["setting"] for r in res["rows"]} == {"vlm-t0.5", "vlm-t1"}
    for r in res["rows"]:
        m = r["metrics"]
        assert 0 <= m["accuracy"] <= 1 and 0 < m["parse_rate"] <= 1 and m["ms_per_example"] > 0
        assert (m["rcpo_ms_per_step"] > 0) == r["method"].startswith("gui-rcpo")
    assert (tmp_path / "gui-grounding-vlm.md").exists() and (tmp_path / "gui-grounding-vlm.json").exists()
    assert cache.has("gui-vlm", QUICK_VLM_CONFIG) and not cache.has("gui-vlm", VLM_CONFIG)
    # the grid-cell task keeps its own settings and methods
    assert "argmax" in GUIGrounding.methods and "default" in GUIGrounding.settings


def test_same_seed_same_result(cache):
    a = GUIGroundingVLM(cache=cache, quick=True, screens=3).run("gui-rcpo+rc", "vlm-t1", 8, seed=1)
    b = GUIGroundingVLM(cache=cache, quick=True, screens=3).run("gui-rcpo+rc", "vlm-t1", 8, seed=1)
    for m in ("ms_per_example", "rcpo_ms_per_step"):
        a.pop(m), b.pop(m)
    assert a == b


def test_rcpo_never_reads_labels(cache):
    clean = GUIGroundingVLM(cache=cache, quick=True, screens=3)
    noisy = GUIGroundingVLM(cache=cache, quick=True, screens=3)
    examples, _ = noisy.data(2)
    rng = np.random.default_rng(0)
    for ex in examples:
        ex.box = tuple(rng.uniform(0, 10, 4))
    (a, _), _ = clean.adapted(2, "vlm-t0.5")
    (b, _), _ = noisy.adapted(2, "vlm-t0.5")
    start = clean.model()[0].state_dict()
    assert any(not torch.equal(start[k], v) for k, v in a.state_dict().items())
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


def test_bad_options(cache):
    with pytest.raises(MmttsError, match="rcpo_params='half'"):
        GUIGroundingVLM(cache=cache, quick=True, rcpo_params="half")
    with pytest.raises(MmttsError, match="no method"):
        GUIGroundingVLM(cache=cache, quick=True).run("argmax", "vlm-t0.5", 8, 0)
