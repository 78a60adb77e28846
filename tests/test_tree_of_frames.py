"""Tree-of-Frames: the tree's shape follows the budget, pruning keeps what it says, a level is one batch."""

import pytest
import torch

import mmtts
from mmtts.core import BudgetError, FunctionVerifier, MmttsError
from mmtts.core.errors import SettingsError
from mmtts.strategies.tree_of_frames import TreeOfFrames, survivors
from mmtts.verifiers.video import PerDepth

from helpers import Stop, stop_after
from test_video_process import MEAN, ar_process, clip_process


def calls(module):
    """Batch sizes of every forward through ``module``."""
    sizes = []
    module.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    return sizes


def test_survivors_keep_the_median_or_the_top_fraction():
    s = torch.tensor([3.0, 1.0, 2.0, 5.0, 0.0])
    assert survivors(s, "median").tolist() == [3, 0, 2]  # ceil(5 / 2), best first: all at or above the median
    assert survivors(s, 0.4).tolist() == [3, 0]
    assert survivors(s, 0.01).tolist() == [3]
    assert survivors(torch.tensor([1.0, 1.0, 1.0, 1.0]), "median").tolist() == [0, 1]  # ties: the earlier


def test_tree_shape_follows_the_budget_and_each_level_is_one_batch():
    proc = ar_process(eta=0.0, frames=4)  # 4 units of 3 stages
    sizes = calls(proc.model)
    r = mmtts.search(proc, MEAN, "tree-of-frames", budget=100, seed=0, img_branch=2, branching=2)
    # per root: 2 first units, 2 children at each later depth (pruned to 1 at depths 1 and 2): 8 units = 24 NFE
    assert r.extra == {"roots": 4, "levels": [8, 8, 8, 8], "survivors": [4, 4, 4, 8]}
    assert r.budget["nfe"] == 96 == sum(sizes)
    assert sizes == [8] * 12  # one forward per stage, every node of the level in it
    assert len(r.population_scores) == 8  # the leaves, scored on the full video
    assert r.budget["verifier_calls"] == 8 + 8 + 8 + 8
    assert r.outputs.shape == (1, 1, 4, 8, 8)
    r3 = mmtts.search(proc, MEAN, "tree-of-frames", budget=3 * 24 + 23, seed=0, img_branch=2, branching=2)
    assert r3.extra["roots"] == 3 and r3.budget["nfe"] == 72
    with pytest.raises(BudgetError, match="tree of 1 root.* costs 24 NFE"):
        mmtts.search(proc, MEAN, "tree-of-frames", budget=23, seed=0, img_branch=2, branching=2)
    with pytest.raises(BudgetError, match="tree of 5 root.* costs 120 NFE"):
        mmtts.search(proc, MEAN, "tree-of-frames", budget=100, seed=0, n=5, img_branch=2, branching=2)


def test_fraction_pruning_and_branching_per_depth():
    proc = ar_process(eta=0.0, frames=4)
    t = TreeOfFrames(n=2, img_branch=3, branching=(4, 2, 3), prune_at=(1, 2), prune=0.25)
    levels, kept = t.shape(2, proc.num_units)
    assert levels == [6, 8, 4, 3] and kept == [2, 2, 1, 3]
    r = mmtts.search(proc, MEAN, t, budget=10_000, seed=0)
    assert r.extra["levels"] == levels and r.budget["nfe"] == 3 * sum(levels)


def test_children_differ_and_pruning_keeps_the_best_partial_videos():
    proc = ar_process(eta=0.0, frames=3)
    seen = []

    def record(v):
        s = v.mean((1, 2, 3, 4))
        seen.append((v.shape[2], s.clone(), v.clone()))
        return s

    r = mmtts.search(proc, FunctionVerifier(record, name="rec"), "tree-of-frames", budget=10_000, seed=0, n=2,
                     img_branch=2, branching=4)
    frames = [f for f, _, _ in seen]
    assert frames == [1, 2, 3]  # first units, the pruned level 1, the leaves
    _, s1, v1 = seen[1]
    assert len(s1) == 8 and len({round(float(x), 6) for x in s1}) == 8  # 8 different children
    kept = v1[survivors(s1, "median")]
    _, _, leaves = seen[2]
    # each leaf's first two frames are a survivor's partial video (x0-hat was the final frame: DDIM's last step)
    for leaf in leaves:
        assert min(float((leaf[:, :2] - k).abs().max()) for k in kept) < 1e-5
    assert r.extra["survivors"] == [2, 4, 16]


def test_per_depth_verifier_judges_each_depth_with_its_own_verifier():
    proc = ar_process(eta=0.0, frames=4)
    got = {"a": [], "b": []}

    def member(key):
        def fn(v):
            got[key].append(v.shape[2])
            return v.mean((1, 2, 3, 4))
        return FunctionVerifier(fn, name=key)

    judge = PerDepth({1: member("a"), 3: member("b")})
    mmtts.search(proc, judge, "tree-of-frames", budget=10_000, seed=0, n=1, img_branch=2, branching=2)
    assert got == {"a": [1, 2], "b": [3, 4]}
    with pytest.raises(MmttsError, match="add an entry for 1"):
        PerDepth({2: member("a")})(torch.zeros(1, 1, 1, 2, 2))


def test_a_degenerate_tree_is_best_of_n():
    proc = ar_process(eta=1.0, frames=3)
    budget = proc.nfe_per_candidate() * 5
    tree = mmtts.search(proc, MEAN, "tree-of-frames", budget=budget, seed=4, img_branch=1, branching=1,
                         prune_at=(), keep=2)
    bon = mmtts.search(proc, MEAN, "best-of-n", budget=budget, seed=4, keep=2)
    assert tree.extra["roots"] == 5 and torch.equal(tree.outputs, bon.outputs) and torch.equal(tree.scores, bon.scores)


def test_same_seed_same_tree():
    proc = ar_process(eta=1.0, frames=3)
    a, b = (mmtts.search(proc, MEAN, "tree-of-frames", budget=200, seed=7, img_branch=2, branching=3)
            for _ in range(2))
    assert torch.equal(a.outputs, b.outputs) and torch.equal(a.population_scores, b.population_scores)


def test_bad_settings_and_processes_are_refused():
    with pytest.raises(SettingsError, match="prune"):
        TreeOfFrames(prune=1.5)
    with pytest.raises(SettingsError, match="branching"):
        TreeOfFrames(branching=(2, 0))
    with pytest.raises(SettingsError, match="last depth"):
        mmtts.search(ar_process(frames=3), MEAN, "tree-of-frames", budget=1000, seed=0, prune_at=(2,))
    with pytest.raises(MmttsError, match="frame-autoregressive"):
        mmtts.search(clip_process(), MEAN, "tree-of-frames", budget=1000, seed=0)


def test_resume_gives_the_uninterrupted_tree(tmp_path):
    proc = ar_process(eta=1.0, frames=4)
    kw = dict(budget=200, seed=5, img_branch=2, branching=2)
    full = mmtts.search(proc, MEAN, "tree-of-frames", **kw)
    path = tmp_path / "tof.ckpt"
    with pytest.raises(Stop):
        mmtts.search(proc, MEAN, "tree-of-frames", checkpoint=path, on_checkpoint=stop_after(2), **kw)
    resumed = mmtts.search(proc, MEAN, "tree-of-frames", checkpoint=path, resume=True, **kw)
    assert torch.equal(full.outputs, resumed.outputs) and torch.equal(full.population_scores,
                                                                       resumed.population_scores)
    assert full.budget["nfe"] == resumed.budget["nfe"] and full.extra == resumed.extra


def test_look_ahead_judges_a_level_on_its_x0_hat_and_finishes_only_the_kept_nodes():
    proc = ar_process(eta=0.0, frames=4)  # 4 units of 3 stages
    sizes = calls(proc.model)
    seen = []

    def record(v):
        seen.append(v.shape[2])
        return v.mean((1, 2, 3, 4))

    t = TreeOfFrames(n=2, img_branch=2, branching=2, look_ahead=1)
    r = mmtts.search(proc, FunctionVerifier(record, name="rec"), t, budget=10_000, seed=0)
    # each level: every node for the first step, the kept nodes for the other two; the leaves are never cut
    assert sizes == [4, 2, 2] * 3 + [4, 4, 4]
    assert r.budget["nfe"] == sum(sizes) == t.cost(proc, 2)[0] == 36
    assert seen == [1, 2, 3, 4]  # judged in each unit after one step (its x0-hat), the leaves when finished
    assert r.extra == {"roots": 2, "levels": [4, 4, 4, 4], "survivors": [2, 2, 2, 4]}
    # the budget sizes the tree with the look-ahead's cost: 18 NFE per root here
    assert mmtts.search(proc, MEAN, "tree-of-frames", budget=54, seed=0, img_branch=2, branching=2,
                        look_ahead=1).extra["roots"] == 3


def test_look_ahead_of_a_whole_unit_is_the_default_tree():
    proc = ar_process(eta=1.0, frames=4)
    kw = dict(budget=200, seed=3, img_branch=2, branching=3, prune=1 / 3)
    a = mmtts.search(proc, MEAN, "tree-of-frames", **kw)
    b = mmtts.search(proc, MEAN, "tree-of-frames", look_ahead=proc.stages_per_unit, **kw)
    assert torch.equal(a.outputs, b.outputs) and torch.equal(a.population_scores, b.population_scores)
    assert (a.budget["nfe"], a.budget["verifier_calls"]) == (b.budget["nfe"], b.budget["verifier_calls"])
    with pytest.raises(SettingsError, match="look_ahead=4 must be at most the 3 denoising steps"):
        mmtts.search(proc, MEAN, "tree-of-frames", look_ahead=4, **kw)
    with pytest.raises(SettingsError, match="look_ahead"):
        TreeOfFrames(look_ahead=0)


def test_a_pruning_rule_per_depth():
    proc = ar_process(eta=0.0, frames=4)
    t = TreeOfFrames(n=1, img_branch=2, branching=4, prune_at=(2, 1), prune=(0.25, "median"))
    assert t.prune_at == (1, 2) and t.prune == ("median", 0.25)
    levels, kept = t.shape(1, proc.num_units)
    assert levels == [2, 4, 8, 8] and kept == [1, 2, 2, 8]
    r = mmtts.search(proc, MEAN, t, budget=10_000, seed=0)
    assert r.extra["survivors"] == kept and r.budget["nfe"] == 3 * sum(levels)
    with pytest.raises(SettingsError, match="one rule per depth"):
        TreeOfFrames(prune_at=(1, 2), prune=(0.5,))
    with pytest.raises(SettingsError, match="one rule per depth"):
        TreeOfFrames(prune=(0.5, 0.5))


def test_the_published_shape_every_unit_the_best_of_its_candidates():
    proc = ar_process(eta=0.0, frames=4)
    sizes = calls(proc.model)
    seen = []

    def record(v):
        s = v.mean((1, 2, 3, 4))
        seen.append((s.clone(), v.clone()))
        return s

    # Video-T1's defaults: 5 first units, then 2 candidates per unit; 5 children at depth 1, then 1; median pruning
    t = TreeOfFrames(n=1, img_branch=(5, 2), branching=(5, 1), prune_at=(2,), prune="median")
    r = mmtts.search(proc, FunctionVerifier(record, name="rec"), t, budget=10_000, seed=0)
    assert r.extra == {"roots": 1, "levels": [5, 10, 10, 6], "survivors": [1, 5, 3, 3]}
    assert sizes == [5] * 3 + [10] * 6 + [6] * 3 and r.budget["nfe"] == sum(sizes) == t.cost(proc, 1)[0]
    assert [v.shape for _, v in seen][1:3] == [(10, 1, 2, 8, 8), (10, 1, 3, 8, 8)]
    assert r.budget["verifier_calls"] == 5 + 10 + 10 + 6 + 3 == t.cost(proc, 1)[1]
    s1, v1 = seen[1]
    pairs = s1.reshape(5, 2)
    won, lost = v1[pairs.argmax(1) + torch.arange(5) * 2], v1[pairs.argmin(1) + torch.arange(5) * 2]
    # every depth-2 candidate continues a winner of its pair at depth 1, none a loser
    for v in seen[2][1]:
        assert min(float((v[:, :2] - w).abs().max()) for w in won) < 1e-5
        assert min(float((v[:, :2] - w).abs().max()) for w in lost) > 1e-3
    with pytest.raises(SettingsError, match="img_branch"):
        TreeOfFrames(img_branch=(5, 0))
