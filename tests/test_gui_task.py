"""The gui-grounding benchmark in its quick version: data files, methods, determinism, labels unread."""

import json

import numpy as np
import pytest
import torch

from mmtts.bench import run_benchmark
from mmtts.cli import main
from mmtts.core.errors import MmttsError
from mmtts.modalities.gui.parse import parse_answer
from mmtts.modalities.gui.sampler import HeatmapSampler
from mmtts.tasks.cache import ModelCache
from mmtts.tasks.gui_grounding import (BOX_CONFIG, MODEL_CONFIG, QUICK_BOX_CONFIG, QUICK_MODEL_CONFIG,
                                       QUICK_SETTING_MODELS, SETTING_TEMPERATURE, GUIGrounding)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One quick model for the module (it trains in seconds)."""
    return ModelCache(tmp_path_factory.mktemp("gui-cache"))


pytestmark = pytest.mark.usefixtures("single_thread")


def test_quick_benchmark_runs_every_method(cache, tmp_path):
    task = GUIGrounding(cache=cache, quick=True)
    res = run_benchmark(task, [0, 1, 2], list(task.quick_budgets), out=tmp_path)
    assert {r["method"] for r in res["rows"]} == {"greedy", "argmax", "gui-rc", "gui-rcpo", "gui-rcpo+rc"}
    assert {r["setting"] for r in res["rows"]} == {"default", "short-training", "boxes", "boxes-short-training"}
    for r in res["rows"]:
        m = r["metrics"]
        assert 0 <= m["accuracy"] <= 1 and m["parse_rate"] == 1.0 and m["ms_per_example"] > 0
        assert {"acc_text", "acc_icon", "acc_position"} <= set(m)
    assert {c["baseline"] for c in res["comparisons"]} == {"gui-rc"}
    assert (tmp_path / "gui-grounding.md").exists() and (tmp_path / "gui-grounding.png").stat().st_size > 5000
    # the quick model has its own cache entry, apart from the full one
    assert cache.has("gui-grounding-net", QUICK_MODEL_CONFIG) and not cache.has("gui-grounding-net", MODEL_CONFIG)


def test_data_is_written_and_read_as_screenspot_files(cache):
    task = GUIGrounding(cache=cache, quick=True)
    examples, thumbs = task.data(4)
    ann = json.loads((task.data_dir(4) / "screenspot.json").read_text())
    assert len(ann) == len(examples) == len(thumbs) and {"img_filename", "bbox", "instruction"} <= set(ann[0])
    assert {ex.element_type for ex in examples} <= {"text", "icon", "position"}
    for ex in examples:
        x1, y1, x2, y2 = ex.box
        assert 0 <= x1 < x2 <= ex.image_size[0] and 0 <= y1 < y2 <= ex.image_size[1]
    other, _ = GUIGrounding(cache=cache, quick=True).data(5)
    assert [e.instruction for e in other] != [e.instruction for e in examples]


def test_same_seed_same_result(cache):
    a = GUIGrounding(cache=cache, quick=True).run("gui-rc", "default", 8, seed=1)
    b = GUIGrounding(cache=cache, quick=True).run("gui-rc", "default", 8, seed=1)
    a.pop("ms_per_example"), b.pop("ms_per_example")
    assert a == b


def test_rcpo_never_reads_labels(cache):
    clean = GUIGrounding(cache=cache, quick=True)
    noisy = GUIGrounding(cache=cache, quick=True)
    examples, _ = noisy.data(2)
    rng = np.random.default_rng(0)
    for ex in examples:
        ex.box = tuple(rng.uniform(0, 10, 4))
    a, _ = clean.adapted(2)
    b, _ = noisy.adapted(2)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


def test_cli_quick_and_bad_names(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("MMTTS_CACHE", str(cache.root))
    rc = main(["bench", "gui-grounding", "--quick", "--seeds", "0", "1", "--methods", "greedy", "gui-rc",
               "--out", str(tmp_path)])
    assert rc == 0 and json.loads((tmp_path / "gui-grounding.json").read_text())["budgets"] == [8]
    task = GUIGrounding(cache=cache, quick=True)
    with pytest.raises(MmttsError, match="no method"):
        task.run("gui-rcpo-rc", "default", 8, 0)
    with pytest.raises(MmttsError, match="no option"):
        GUIGrounding(cache=cache, quick=True, K=3)


def test_settings_differ_in_the_model_and_temperature(cache):
    task = GUIGrounding(cache=cache, quick=True)
    strong, weak = task.model("default"), task.model("short-training")
    assert cache.has("gui-grounding-net", QUICK_SETTING_MODELS["short-training"])
    assert any(not torch.equal(a, b) for a, b in zip(strong.state_dict().values(), weak.state_dict().values()))
    assert task.detail("gui-rc", "short-training", 8).startswith(f"K=8, T={SETTING_TEMPERATURE['short-training']:g},")
    assert task.detail("gui-rc", "default", 8).startswith(f"K=8, T={SETTING_TEMPERATURE['default']:g},")
    # the option overrides both settings, and the CLI passes it as a string
    fixed = GUIGrounding(cache=cache, quick=True, temperature="0.8")
    assert fixed.temperature("default") == fixed.temperature("short-training") == 0.8
    with pytest.raises(MmttsError, match="temperature > 0"):
        GUIGrounding(cache=cache, quick=True, temperature=0)
    with pytest.raises(MmttsError, match="must be a number"):
        GUIGrounding(cache=cache, quick=True, temperature="warm")
    with pytest.raises(MmttsError, match="setting"):
        task.model("tiny")


def test_box_settings_answer_with_boxes_of_the_same_model(cache):
    task = GUIGrounding(cache=cache, quick=True)
    for points, boxes in (("default", "boxes"), ("short-training", "boxes-short-training")):
        a, b = task.model(points), task.model(boxes)
        assert b.has_boxes and b.policy is not a
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.policy.state_dict().values()))
    assert cache.has("gui-element-boxes", QUICK_BOX_CONFIG) and not cache.has("gui-element-boxes", BOX_CONFIG)
    examples, thumbs = task.data(0)
    ex = examples[0]
    answer = HeatmapSampler(task.model("boxes"), answer="box").sample(thumbs[0], ex.instruction, [3, 4, 5, 6], 1.0)
    assert all(parse_answer(t)[0] == "box" for t in answer)
