"""The tts-var strategy: potentials, structure maps, clustering, schedules and bad input."""

import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import mmtts
from mmtts.core.errors import BudgetError, MmttsError
from mmtts.core.rng import Streams
from mmtts.core.strategy import SearchContext
from mmtts.core.verifier import as_verifier
from mmtts.modalities.var import MultiScaleVQ, NextScaleTransformer, VARProcess
from mmtts.strategies.tts_var import (TTSVAR, distinct_copies, linear_fractions, nearest_to_centroids, potential,
                                     structure_maps, top_components)

from helpers import Stop, stop_after

SCALES = (1, 2, 3, 4, 6, 8)
TOKENS = 130


@pytest.fixture(scope="module")
def process():
    torch.manual_seed(1)
    tok = MultiScaleVQ(SCALES, vocab=16, code_dim=4, width=4).eval()
    with torch.no_grad():  # centre the random decoder's output in [0, 1], so that images differ after clamping
        tok.decoder[-1].bias.fill_(0.5)
    tf = NextScaleTransformer(SCALES, vocab=16, code_dim=4, width=16, depth=1, heads=2).eval()
    return VARProcess(tok, tf)


def ink(images):
    return images.mean((1, 2, 3)) * 10


def pixels(images):
    return images.flatten(1)


HISTORY = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0], [4.0, 4.0, -2.0]])


@pytest.mark.parametrize("kind, want", [
    ("value", [2.0, 5.0, -2.0]),
    ("diff", [2.0 - 3.0, 5.0 - (-1.0), -2.0 - 4.0]),
    ("sum", [6.0, 4.0, 6.0]),
    ("max", [3.0, 5.0, 4.0]),
    ("topk", [(3.0 + 2.0) / 2, (5.0 + 0.0) / 2, (4.0 + 4.0) / 2]),
])
def test_each_potential_matches_a_hand_computation(kind, want):
    assert potential(HISTORY, kind).tolist() == want


def test_potentials_at_the_first_resampling_scale_and_with_minus_inf():
    first = HISTORY[:, :1]
    for kind in ("value", "diff", "sum", "max", "topk"):
        assert potential(first, kind).tolist() == [1.0, 0.0, 4.0]
    assert potential(HISTORY, "topk", k=3).tolist() == [2.0, 4.0 / 3, 2.0]
    ranked_last = torch.tensor([[float("-inf"), float("-inf")], [1.0, 2.0]])
    assert potential(ranked_last, "diff").tolist() == [float("-inf"), 1.0]  # -inf - -inf is NaN: ranked last
    with pytest.raises(MmttsError, match="unknown potential"):
        potential(HISTORY, "mean")


def test_structure_map_is_each_images_first_principal_component():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 16, 5, generator=g, dtype=torch.float64)
    maps = structure_maps(f)
    for b in range(3):
        x = f[b] - f[b].mean(0)
        _, _, vt = np.linalg.svd(x.numpy())
        proj = x.numpy() @ vt[0]
        proj *= np.sign(proj[np.argmax(np.abs(proj))])
        np.testing.assert_allclose(maps[b].numpy(), proj, atol=1e-10)
    # the sign convention makes the map independent of the component's arbitrary sign; a (B, C, H, W) map is
    # read as H*W patches of C channels
    assert torch.allclose(structure_maps(f.transpose(1, 2).reshape(3, 5, 4, 4)), maps)
    assert torch.equal(structure_maps(f[:, 0]), f[:, 0])  # global features pass through
    bad = f.clone()
    bad[1, 3, 2] = float("nan")
    with pytest.raises(MmttsError, match="NaN/inf for 1 of 3 candidates"):
        structure_maps(bad)


def test_top_components_equal_the_eigendecomposition_and_fall_back_to_it():
    g = np.random.default_rng(0)
    a = g.normal(size=(8, 6, 4))
    gram = a @ a.transpose(0, 2, 1)  # rank 4 of 6: two zero eigenvalues
    gram[1] = np.diag([2.0, 2.0, 1.0, 0.0, 0.0, 0.0])  # a repeated top eigenvalue: any unit vector of its plane
    gram[2] = 0.0
    gram[3] = np.diag([1.0, 1.0 - 1e-9, 0.5, 0.0, 0.0, 0.0])  # squaring cannot separate the top pair: exact path
    got = top_components(gram)
    w, v = np.linalg.eigh(gram)
    want = v[:, :, -1] * np.sqrt(np.clip(w[:, -1:], 0, None))
    sign = np.sign((got * want).sum(1, keepdims=True))
    generic = [0, 4, 5, 6, 7]
    np.testing.assert_allclose((got * np.where(sign == 0, 1, sign))[generic], want[generic], atol=1e-12)
    np.testing.assert_array_equal(got[3], want[3])  # decomposed exactly, not by squaring
    np.testing.assert_array_equal(got[2], np.zeros(6))
    # the degenerate case still returns a top eigenvector scaled by the root of its eigenvalue
    np.testing.assert_allclose(gram[1] @ got[1], 2.0 * got[1], atol=1e-12)
    assert np.isclose(np.linalg.norm(got[1]), np.sqrt(2.0)) and np.allclose(got[1][2:], 0.0)


def test_distinct_copies_keeps_each_distinct_row_first_or_gives_up():
    rows = torch.tensor([[0.0, 1.0], [-0.0, 1.0], [2.0, 2.0], [2.0, 2.0], [3.0, 0.0]])  # -0.0 equals 0.0
    assert distinct_copies(rows, 3).tolist() == [0, 2, 4]
    assert distinct_copies(rows, 4).tolist() == [0, 1, 2, 4]  # then the first further copy
    assert distinct_copies(rows, 2) is None  # three distinct rows need clustering into two
    assert distinct_copies(rows, 5).tolist() == [0, 1, 2, 3, 4]
    # the same choice as the clustering's own check on identical points
    assert nearest_to_centroids(rows, 4, seed=0).tolist() == distinct_copies(rows, 4).tolist()


def test_identical_previews_are_neither_embedded_nor_clustered(process):
    greedy = VARProcess(process.tokenizer, process.transformer, top_k=1)  # every candidate samples the same
    calls = []

    def counted(images):
        calls.append(len(images))
        return images.flatten(1)

    res = mmtts.search(greedy, ink, "tts-var", budget=8 * TOKENS, seed=0, features=counted)
    clusters = [k for k in res.extra["kept"] if k["kind"] == "cluster"]
    assert calls == [] and len(clusters) == 2
    assert all(k["index"] == list(range(len(k["index"]))) for k in clusters)  # the first copies, in order
    # the published selection embeds and clusters them anyway
    mmtts.search(greedy, ink, "tts-var", budget=8 * TOKENS, seed=0, features=counted, published=True)
    assert len(calls) == 2
    assert TTSVAR().cluster_init == "ward" and TTSVAR(published=True).cluster_init == "k-means++"


def test_clustering_keeps_the_sample_nearest_each_centroid():
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    offsets = np.array([[0.3, 0.1], [-0.2, 0.4], [0.05, -0.05], [-0.1, -0.3]])
    pts = np.concatenate([c + offsets[: 3 + (i == 1)] for i, c in enumerate(centres)])  # 3, 4, 3 points
    labels = np.repeat([0, 1, 2], [3, 4, 3])
    want = []
    for c in range(3):
        members = np.flatnonzero(labels == c)
        mean = pts[members].mean(0)  # k-means centroids of well-separated clusters are their means
        want.append(int(members[np.argmin(np.linalg.norm(pts[members] - mean, axis=1))]))
    got = nearest_to_centroids(torch.tensor(pts), 3, seed=0)
    assert got.tolist() == sorted(want) == [2, 5, 9]
    # identical points leave fewer distinct clusters: the batch is still filled to k
    same = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.0, 5.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = nearest_to_centroids(same, 3, seed=0).tolist()
    assert len(kept) == 3 and {0, 3} <= set(kept)


def test_identical_maps_are_kept_once_before_any_copy():
    maps = torch.tensor([[0.0], [0.0], [1.0], [1.0], [1.0], [5.0]])  # three distinct maps among six
    assert nearest_to_centroids(maps, 4, seed=0).tolist() == [0, 1, 2, 5]  # each distinct one, then a copy
    assert nearest_to_centroids(maps, 3, seed=0).tolist() == [0, 2, 5]
    # the published selection runs k-means over the copies too: still one per distinct map here
    published = nearest_to_centroids(maps, 3, seed=0, distinct_first=False).tolist()
    assert sorted(int(maps[i]) for i in published) == [0, 1, 5]


def test_published_preset_runs_value_with_kmeanspp(process):
    with pytest.raises(MmttsError, match="published=True runs the value potential"):
        TTSVAR(published=True, potential="diff")
    with pytest.raises(MmttsError, match="published=True runs the value potential"):
        TTSVAR(published=True, cluster_init="ward")
    a = mmtts.search(process, ink, "tts-var", budget=8 * TOKENS, seed=0, features=pixels, published=True)
    b = mmtts.search(process, ink, "tts-var", budget=8 * TOKENS, seed=0, features=pixels, published=True)
    assert torch.equal(a.outputs, b.outputs)
    assert [k["kind"] for k in a.extra["kept"]] == ["cluster", "cluster", "resample", "resample"]


def test_ward_seeding_keeps_what_kmeanspp_keeps_on_separated_clusters():
    g = np.random.default_rng(0)
    centres = g.normal(scale=20.0, size=(6, 5))
    pts = torch.tensor(np.repeat(centres, 4, axis=0) + g.normal(scale=0.1, size=(24, 5)))
    ward = nearest_to_centroids(pts, 6, seed=0, init="ward")
    assert ward.tolist() == nearest_to_centroids(pts, 6, seed=0).tolist()
    assert sorted(int(i) // 4 for i in ward) == list(range(6))  # one per cluster
    # with k close to the batch the closest pair merges first: of 5 points, the two nearest become one cluster
    line = torch.tensor([[0.0], [1.0], [1.1], [3.0], [6.0]])
    assert nearest_to_centroids(line, 4, seed=0, init="ward").tolist() in ([0, 1, 3, 4], [0, 2, 3, 4])
    with pytest.raises(MmttsError, match="unknown clustering init"):
        nearest_to_centroids(pts, 3, seed=0, init="random")
    with pytest.raises(MmttsError, match="unknown cluster_init"):
        TTSVAR(cluster_init="kmeans")


def test_schedule_is_sized_from_the_budget_and_descends(process):
    s = TTSVAR()
    assert linear_fractions(6, [1, 2, 3, 4]) == [1.0, 1.0, 0.8, 0.6, 0.4, 0.2]
    assert s.schedule(6, 10) == [10, 10, 8, 6, 4, 2]
    res = mmtts.search(process, ink, "tts-var", budget=8 * TOKENS, seed=0, features=pixels)
    batches = res.extra["batches"]
    assert all(b >= a for a, b in zip(batches[1:], batches))
    costs = [1, 4, 9, 16, 36, 64]
    spent = sum(c * b for c, b in zip(costs, batches))
    assert res.budget["nfe"] == spent <= 8 * TOKENS
    bigger = s.schedule(6, batches[0] + 1)
    assert sum(c * b for c, b in zip(costs, bigger)) > 8 * TOKENS  # the largest first batch that fits
    kinds = [(k["scale"], k["kind"]) for k in res.extra["kept"]]
    assert kinds == [(1, "cluster"), (2, "cluster"), (3, "resample"), (4, "resample")]
    # the verifier saw each resampling scale's batch and the final batch
    assert res.budget["verifier_calls"] == batches[3] + batches[4] + batches[5]


@pytest.mark.parametrize("fractions", [None, (1.0, 1.0, 0.9, 0.8, 0.5, 0.5)])
def test_the_first_batch_is_the_largest_whose_schedule_fits(process, fractions):
    s = TTSVAR(fractions=fractions)
    costs = [1, 4, 9, 16, 36, 64]
    for nfe in range(130, 5000, 53):
        for calls in (None, 40):
            budget = mmtts.Budget(max_nfe=nfe, max_verifier_calls=calls)
            fits = lambda b: s.cost(costs, b) <= nfe and (calls is None or s.calls(b) <= calls)
            n = 1
            while fits(s.schedule(6, n + 1)):
                n += 1
            assert s.plan(SimpleNamespace(process=process, budget=budget)) == s.schedule(6, n)


def test_feature_extractor_time_is_verifier_time_reported_on_its_own(process):
    def slow_pixels(images):
        time.sleep(0.1)
        return images.flatten(1)

    fast = mmtts.search(process, ink, "tts-var", budget=8 * TOKENS, seed=0, features=pixels)  # imports k-means
    res = mmtts.search(process, ink, "tts-var", budget=8 * TOKENS, seed=0, features=slow_pixels)
    assert torch.equal(res.outputs, fast.outputs) and res.extra["kept"] == fast.extra["kept"]
    # two clustering scales, one extractor call each: on the verifier clock, spending no verifier calls
    assert res.extra["features_s"] >= 0.2 > res.extra["cluster_s"]
    assert res.budget["seconds"]["verifier"] >= res.extra["features_s"]
    assert res.budget["verifier_calls"] == fast.budget["verifier_calls"]
    assert res.budget["seconds"]["wall"] >= sum(res.budget["seconds"][k] for k in ("model", "decode", "verifier"))


@pytest.mark.parametrize("kind", ["value", "diff", "sum", "max", "topk"])
def test_same_seed_same_result_for_every_potential(process, kind):
    a = mmtts.search(process, ink, "tts-var", budget=6 * TOKENS, seed=3, potential=kind, features=pixels, keep=2)
    b = mmtts.search(process, ink, "tts-var", budget=6 * TOKENS, seed=3, potential=kind, features=pixels, keep=2)
    assert torch.equal(a.outputs, b.outputs) and torch.equal(a.scores, b.scores)
    assert a.extra["kept"] == b.extra["kept"]


def test_resampled_survivors_are_their_parents_continued(process):
    """Every survivor's tokens up to the resampling scale are those of the fresh candidate its line started
    from (codes and cache followed it), and every later token is its own."""
    s = TTSVAR(batches=[4, 4, 4, 4, 4, 4], cluster_at=(), resample_at=(2,), lmbda=50.0, keep=4)
    ctx = SearchContext(process, as_verifier(ink), mmtts.Budget(max_nfe=4 * TOKENS), seed=1)
    sel = s.run(ctx)
    assert ctx.meter.nfe == 4 * TOKENS
    fresh = process.init(Streams.spawn(1, 4))
    for _ in range(3):
        fresh = process.step(fresh)
    codes = sel.state.data["codes"]
    assert torch.equal(codes[:, :14], fresh.data["codes"][sel.state.origin, :14])
    origin = sel.state.origin.tolist()
    assert sorted(origin) == sorted(sel.extra["kept"][0]["index"])
    twins = [(a, b) for a in range(4) for b in range(a + 1, 4) if origin[a] == origin[b]]
    assert twins  # lmbda=50 duplicates the best
    for a, b in twins:  # copies of one parent diverge after the resampling scale (forked streams)
        assert not torch.equal(codes[a, 14:], codes[b, 14:])


def test_bad_input_errors(process):
    with pytest.raises(MmttsError, match="batches has 7 entries for a process of 6 scales"):
        mmtts.search(process, ink, "tts-var", budget=20 * TOKENS, batches=[8, 8, 6, 4, 2, 1, 1])
    with pytest.raises(MmttsError, match="increase at scale 2"):
        TTSVAR(batches=[4, 4, 6, 2])
    with pytest.raises(BudgetError, match="below the cost of one candidate|below one sample"):
        mmtts.search(process, ink, "tts-var", budget=TOKENS - 1)
    with pytest.raises(BudgetError, match="below one sample of tts-var"):
        mmtts.search(process, ink, "tts-var", budget=mmtts.Budget(max_nfe=10 * TOKENS, max_verifier_calls=2))
    with pytest.raises(MmttsError, match="NaN/inf"):
        mmtts.search(process, ink, "tts-var", budget=8 * TOKENS, features=lambda x: x.flatten(1) * float("nan"))
    with pytest.raises(MmttsError, match="shrinks after scale 0"):
        mmtts.search(process, ink, "tts-var", budget=8 * TOKENS, batches=[4, 2, 2, 2, 2, 2])
    with pytest.raises(MmttsError, match="outside 0..4"):
        mmtts.search(process, ink, "tts-var", budget=8 * TOKENS, cluster_at=(5,), resample_at=())
    with pytest.raises(MmttsError, match="both clustering and resampling"):
        TTSVAR(cluster_at=(1, 3), resample_at=(3,))
    with pytest.raises(MmttsError, match="unknown potential"):
        TTSVAR(potential="add")


def test_a_resumed_run_equals_an_uninterrupted_one(process, tmp_path):
    ck = tmp_path / "tts-var.ckpt"

    with pytest.raises(Stop):  # after the second clustering scale
        mmtts.search(process, ink, "tts-var", budget=8 * TOKENS, seed=2, checkpoint=ck, on_checkpoint=stop_after(2))
    resumed = mmtts.search(process, ink, "tts-var", budget=8 * TOKENS, seed=2, checkpoint=ck, resume=True)
    whole = mmtts.search(process, ink, "tts-var", budget=8 * TOKENS, seed=2)
    assert torch.equal(resumed.outputs, whole.outputs) and torch.equal(resumed.scores, whole.scores)
    assert resumed.budget["nfe"] == whole.budget["nfe"] and resumed.extra["kept"] == whole.extra["kept"]
