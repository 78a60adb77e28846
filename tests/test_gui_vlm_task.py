"""The gui-grounding-vlm benchmark in its quick version: every method on the VLM, determinism, labels unread."""

import numpy as np
import pytest
import torch

from mmtts.bench import run_benchmark
from mmtts.core.errors import MmttsError
from mmtts.modalities.gui.data import grounding_accuracy
from mmtts.modalities.gui.elements import DetectedElements
from mmtts.modalities.gui.parse import parse_answers
from mmtts.modalities.gui.vlm import BOX_VLM_CONFIG, QUICK_BOX_VLM_CONFIG, QUICK_VLM_CONFIG, VLM_CONFIG
from mmtts.tasks.cache import ModelCache
from mmtts.tasks.gui_grounding import GUIGrounding, GUIGroundingVLM

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The quick VLMs for the module (they train in seconds)."""
    return ModelCache(tmp_path_factory.mktemp("gui-vlm-cache"))


def test_quick_benchmark_runs_every_method(cache, tmp_path):
    task = GUIGroundingVLM(cache=cache, quick=True, screens=4)
    # both answer formats and both temperatures; the other two settings are the same code paths
    res = run_benchmark(task, [0, 1], list(task.quick_budgets), out=tmp_path, settings=["vlm-t0.5", "vlm-box-t1"])
    assert {r["method"] for r in res["rows"]} == {"greedy", "gui-rc", "gui-rcpo", "gui-rcpo+rc"}
    assert {r["setting"] for r in res["rows"]} == {"vlm-t0.5", "vlm-box-t1"}
    assert set(GUIGroundingVLM.settings) == {"vlm-t0.5", "vlm-t1", "vlm-box-t0.5", "vlm-box-t1", "vlm-snap-t0.5",
                                             "vlm-box-snap-t0.5"}
    for r in res["rows"]:
        m = r["metrics"]
        assert 0 <= m["accuracy"] <= 1 and 0 < m["parse_rate"] <= 1 and m["ms_per_example"] > 0
        assert (m["rcpo_ms_per_step"] > 0) == r["method"].startswith("gui-rcpo")
    assert (tmp_path / "gui-grounding-vlm.md").exists() and (tmp_path / "gui-grounding-vlm.json").exists()
    assert cache.has("gui-vlm", QUICK_VLM_CONFIG) and not cache.has("gui-vlm", VLM_CONFIG)
    assert cache.has("gui-vlm", QUICK_BOX_VLM_CONFIG) and not cache.has("gui-vlm", BOX_VLM_CONFIG)
    rcpo = {r["setting"]: r["detail"] for r in res["rows"] if r["method"] == "gui-rcpo"}
    assert rcpo["vlm-t0.5"].endswith("published reward +50 px") and rcpo["vlm-box-t1"].endswith("boxes as they are")
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


def test_box_settings_answer_with_boxes(cache):
    task = GUIGroundingVLM(cache=cache, quick=True, screens=2)
    examples, pixels = task.data(0)
    for setting, kind in (("vlm-box-t0.5", "box"), ("vlm-t0.5", "point")):
        sampler, _ = task.sampler("greedy", setting, 0)
        texts = [sampler.sample(px, ex.instruction, [0], 0.0)[0] for ex, px in zip(examples, pixels)]
        parsed = [parse_answers([t], "permille", ex.image_size) for t, ex in zip(texts, examples)]
        ok = np.array([p.ok[0] for p in parsed])
        boxes = np.stack([p.boxes[0] for p in parsed])[ok]
        assert ok.mean() >= 0.5, texts                         # the quick models answer in their format
        assert np.isfinite(boxes).all() if kind == "box" else np.isnan(boxes).all()
    # one model per answer format, the click model by default
    assert task.model() is task.model("vlm-t1") is not task.model("vlm-box-t1")


def test_snap_settings_answer_with_the_detected_element(cache):
    task = GUIGroundingVLM(cache=cache, quick=True, screens=2)
    examples, pixels = task.data(0)
    assert task.elements("vlm-box-t0.5", examples[0]) is None
    el = task.elements("vlm-box-snap-t0.5", examples[0])
    assert isinstance(el, DetectedElements) and task.elements("vlm-box-snap-t0.5", examples[0]) is el  # once a screen
    sampler, _ = task.sampler("greedy", "vlm-box-snap-t0.5", 0)
    snapped = []
    for i, (ex, px) in enumerate(zip(examples, pixels)):
        p = parse_answers(sampler.sample(px, ex.instruction, [0], 0.0), "permille", ex.image_size).points
        snapped.append(task.elements("vlm-box-snap-t0.5", ex).snap(p)[0])
    # greedy in a snap setting answers the centre of the detected element under its own answer
    want = grounding_accuracy(examples, np.stack(snapped))["accuracy"]
    assert task.run("greedy", "vlm-box-snap-t0.5", 8, 0)["accuracy"] == want
    vote = task.run("gui-rc", "vlm-box-snap-t0.5", 8, 0)
    assert 0 <= vote["accuracy"] <= 1 and vote["parse_rate"] > 0
    assert task.detail("gui-rc", "vlm-box-snap-t0.5", 8).endswith("snapped to detected elements")
    assert "snapped" not in task.detail("gui-rc", "vlm-box-t0.5", 8)
