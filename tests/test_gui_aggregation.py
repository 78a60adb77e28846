"""Region voting as an aggregation: no verifier, the vote share in its own field, answers independent of batching."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import mmtts
from mmtts.core.errors import MmttsError
from mmtts.core.process import Process
from mmtts.core.registry import STRATEGIES
from mmtts.core.rng import Streams
from mmtts.core.state import State
from mmtts.modalities.gui import ClickProcess, GroundingNet, HeatmapSampler
from mmtts.modalities.gui.model import cells_at
from mmtts.modalities.gui.sampler import SeededTokenChoice

pytestmark = pytest.mark.usefixtures("single_thread")

IMAGE = Image.new("RGB", (640, 360), (120, 130, 140))


@pytest.fixture(scope="module")
def heatmap():
    torch.manual_seed(0)
    return HeatmapSampler(GroundingNet(width=8))


def _answers(proc, streams_batches, order=None):
    """Step each batch of streams through the process (reordered by ``order``); one output dict per batch."""
    outs = []
    for streams in streams_batches:
        state = proc.init(streams)
        if order is not None:
            state = state.select(order)
        outs.append(proc.finish(proc.step(state)))
    return outs


def _same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)   # NaN rows (no box) compare equal


def test_click_answers_do_not_depend_on_chunks_or_order(heatmap):
    from mmtts.modalities.gui.model import BoxGrounding, ElementBoxNet

    torch.manual_seed(1)
    box_net = BoxGrounding(heatmap.model, ElementBoxNet(width=8))
    for sampler in (heatmap, HeatmapSampler(box_net, answer="box")):
        proc = ClickProcess(sampler, IMAGE, "click the red star icon", (1920, 1080))
        whole, = _answers(proc, [Streams.spawn(11, 24)])
        chunks = _answers(proc, [Streams.spawn(11, size, start=start) for start, size in
                                 ((0, 5), (5, 5), (10, 1), (11, 9), (20, 4))])
        assert [t for c in chunks for t in c["texts"]] == whole["texts"]
        for key in ("points", "boxes", "parsed"):
            _same(torch.cat([c[key] for c in chunks]), whole[key])
        perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
        shuffled, = _answers(proc, [Streams.spawn(11, 24)], order=perm)
        assert shuffled["texts"] == [whole["texts"][i] for i in perm.tolist()]
        for key in ("points", "boxes", "parsed"):
            _same(shuffled[key], whole[key][perm])
        assert len(set(whole["texts"])) > 1                     # the candidates differ from one another


def test_the_same_seed_votes_the_same_whatever_the_batching(heatmap):
    """The strategy's answer is a function of the seed; run_strategy draws candidates i = 0..n-1 from it."""
    proc = ClickProcess(heatmap, IMAGE, "click the red star icon", (1920, 1080), temperature=1.0)
    res = mmtts.search(proc, None, "region-vote", budget=16, seed=3, n=16)
    a, b = _answers(proc, [Streams.spawn(3, 10), Streams.spawn(3, 6, start=10)])
    pop = {k: torch.cat([a[k], b[k]]) for k in ("points", "boxes", "parsed")}
    _same(pop["points"], res.population["points"])
    assert a["texts"] + b["texts"] == res.population["texts"]


def test_search_votes_without_a_verifier(heatmap):
    proc = ClickProcess(heatmap, IMAGE, "open the settings", (1920, 1080))
    res = mmtts.search(proc, None, "region-vote", budget=12, seed=0, n=12, alpha=50)
    c = res.extra["consensus"]
    assert res.votes.tolist() == [c.max_vote / 12] and 0 < res.votes[0] <= 1
    assert torch.isnan(res.scores).all() and res.population_scores is None
    assert res.budget["verifier_calls"] == 0 and res.budget["nfe"] == 12
    s = res.summary()
    assert s["votes"] == res.votes.tolist()
    json.dumps({k: v for k, v in s.items() if k != "extra"})
    # strategies that select by score still need a verifier, and say so
    with pytest.raises(MmttsError, match="verifier"):
        mmtts.search(proc, None, "best-of-n", budget=4, seed=0)


def test_region_vote_module_and_keywords():
    import mmtts.strategies.region_vote as rv

    assert mmtts.strategies.region_vote is rv and STRATEGIES.get("region-vote") is rv.RegionVote
    assert rv.RegionVote(n=8).n == 8
    for old in ("samples", "k"):
        with pytest.warns(DeprecationWarning, match="n="):
            s = STRATEGIES.create("region-vote", **{old: 8})
        assert s.n == 8 and s.settings["n"] == 8
    with pytest.raises(MmttsError, match="twice"):
        rv.RegionVote(n=8, samples=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rv.RegionVote(n=4)                                       # the new spelling warns about nothing


class _NoGrid(Process):
    def init(self, streams, first_index=0):
        return State.fresh({"x": torch.zeros(len(streams), 2)}, streams, first_index)

    def step(self, state):
        return State(state.data, state.stage + 1, state.streams, state.ids, state.parents, state.origin)

    def finish(self, state):
        return {"points": state.data["x"]}


def test_extent_is_declared_on_every_process():
    assert Process.extent is None and _NoGrid().extent is None
    with pytest.raises(MmttsError, match="extent"):
        mmtts.search(_NoGrid(), None, "region-vote", budget=2, n=2)


def test_inverse_cdf_cells_follow_the_distribution():
    probs = torch.tensor([[0.25, 0.0, 0.75]], dtype=torch.float64)
    u = torch.tensor([[0.0, 0.2499, 0.2501, 0.9999]])
    assert cells_at(probs.log(), u, 1.0).tolist() == [[0, 0, 2, 2]]       # a cell of zero mass is never drawn
    assert cells_at(probs.log(), u, 0.0).tolist() == [[2, 2, 2, 2]]
    # temperature 2 flattens: p ~ sqrt([0.25, 0.75]) -> cell 0 holds 1 / (1 + sqrt(3)) of the mass
    edge = 1 / (1 + 3 ** 0.5)
    assert cells_at(probs.log(), torch.tensor([[edge - 1e-6, edge + 1e-6]]), 2.0).tolist() == [[0, 2]]


def test_seeded_token_choice_samples_the_softmax_per_row():
    scores = torch.tensor([0.0, 1.0, -1.0, 2.0, -30.0])
    seeds = torch.arange(20000)
    choice = SeededTokenChoice(seeds, temperature=1.5)
    out = choice(torch.zeros(len(seeds), 7, dtype=torch.int64), scores.expand(len(seeds), -1).clone())
    assert ((out == 0).sum(1) == 1).all() and torch.isinf(out).sum() == len(seeds) * 4
    picks = out.argmax(1)
    freq = torch.bincount(picks, minlength=5).double() / len(seeds)
    np.testing.assert_allclose(freq.numpy(), torch.softmax(scores.double() / 1.5, 0).numpy(), atol=0.01)
    # one row's choice depends on its seed and position only
    alone = SeededTokenChoice(seeds[5:6], 1.5)(torch.zeros(1, 7, dtype=torch.int64), scores[None].clone())
    assert int(alone.argmax()) == int(picks[5])
    later = SeededTokenChoice(seeds, 1.5)(torch.zeros(len(seeds), 8, dtype=torch.int64),
                                          scores.expand(len(seeds), -1).clone()).argmax(1)
    assert not torch.equal(later, picks)
    with pytest.raises(MmttsError, match="one seed per row"):
        choice(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 5))
