"""EvoSearch's one-pass next trajectory generation equals its definition: elites, then perturbed forked children
(selection by score alone), and keeps each lineage within its share of the places (``lineages`` > 1)."""

import pytest
import torch
from diffusers import DDIMScheduler

from collections import Counter

from mmtts.core import Budget, FunctionVerifier, State, Streams
from mmtts.core.strategy import SearchContext
from mmtts.modalities.image import ImageProcess, schedule_from_scheduler
from mmtts.modalities.toy_gmm import DEFAULT_MIXTURE, GMMDiffusion
from mmtts.core.rng import StrategyRNG
from mmtts.core.strategy import top_k
from mmtts.strategies.evosearch import EvoSearch

from helpers import CountingProcess
from image_fixtures import tiny_unet

FLAT = FunctionVerifier(lambda x: torch.zeros(len(x), dtype=torch.float64), name="flat")


class RebuildingProcess(CountingProcess):
    """A perturb that builds a new State with new streams (not the usual replace)."""

    def perturb(self, state, scale):
        streams = state.streams.clone()
        x = state.data["x"] + scale * streams.randn((self.dim,))
        return State(dict(state.data, x=x), state.stage.clone(), streams, state.ids.clone(), state.parents.clone(),
                     state.origin.clone(), dict(state.meta))


def image_process():
    return ImageProcess(tiny_unet(), schedule_from_scheduler(DDIMScheduler(num_train_timesteps=100), 5), (1, 8, 8))


def at_stage_two(p, n, seed):
    st = p.init(Streams.spawn(seed, n))
    return p.step(p.step(st))


def fields(st: State) -> list[torch.Tensor]:
    return [*(st.data[k] for k in sorted(st.data)), st.stage, st.streams.seeds, st.streams.counters, st.ids,
            st.parents, st.origin]


def tournament(rng: StrategyRNG, ranked: torch.Tensor, frac: float, k: int, size: int) -> torch.Tensor:
    """The definition: each of ``k`` parents is the best of ``size`` uniform draws over the top fraction."""
    pool = ranked[: -(-int(frac * 10 ** 6 * len(ranked)) // 10 ** 6)]
    draws = StrategyRNG(rng.seed, rng.counter).numpy().integers(0, len(pool), size=(k, size))
    rng.counter += 1
    return pool[torch.from_numpy(draws.min(axis=1))]


@pytest.mark.parametrize("make", [image_process, lambda: GMMDiffusion(DEFAULT_MIXTURE, 6, sampler="ddim", eta=0.0),
                                  lambda: RebuildingProcess(num_stages=5)])
@pytest.mark.parametrize("population,elites", [(2, None), (6, None), (6, 2), (5, 0)])
def test_next_generation_equals_select_resample_perturb_cat(make, population, elites):
    p = make()
    evo = EvoSearch(n=population, elites=elites, noise_generations=0, latent_scale=0.5, lineages=1)
    pop = at_stage_two(p, population, seed=4)
    before = [t.clone() for t in fields(pop)]
    scores = torch.tensor([0.5, -1.0, 0.5, float("-inf"), 2.0, 0.5][:population], dtype=torch.float64)  # ties
    ref_ctx, ctx = (SearchContext(p, FLAT, Budget(max_nfe=10 ** 6), seed=9) for _ in range(2))
    for ahead in (3, 2, 1):
        ranked = top_k(scores, len(scores))
        elite = ranked[: min(evo.elites, evo.P - 1)]
        parents = tournament(ref_ctx.rng, ranked, evo.frac, evo.P - len(elite), evo.tournament)
        kids = p.perturb(pop.resample(parents, fork_all=True), 0.5)
        want = State.cat([pop.select(elite), kids]) if len(elite) else kids
        got = evo._next_generation(ctx, pop, scores, ahead=ahead)
        assert len(got) == population and got.meta == want.meta
        for a, b in zip(fields(got), fields(want)):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert ctx.rng.counter == ref_ctx.rng.counter
        scores = scores.roll(1)
    for a, b in zip(fields(pop), before):  # the population it bred from is left as it was
        assert torch.equal(a, b)


@pytest.mark.parametrize("lineages", [2, 4, 8])
def test_next_generation_keeps_each_lineage_within_its_share(lineages):
    """From 8 lineages of 2 members each, the best lineage first: the elites are the best members within the
    elites' share per lineage, each lineage holds at most ceil(n / lineages) places, the children are perturbed
    forked copies, and the tournament draws are the same ones selection by score alone makes."""
    p = GMMDiffusion(DEFAULT_MIXTURE, 6, sampler="ddim", eta=0.0)
    n, e = 16, 4
    fresh = at_stage_two(p, 8, seed=3)
    pop = fresh.resample([i // 2 for i in range(n)])  # lineage i // 2, distinct ids
    scores = torch.linspace(1.0, 0.0, n, dtype=torch.float64)  # candidate 0 best, lineage 0 best
    evo = EvoSearch(n=n, elites=e, noise_generations=0, latent_scale=0.5, lineages=lineages)
    ctx, ref = (SearchContext(p, FLAT, Budget(max_nfe=10 ** 6), seed=2) for _ in range(2))
    got = evo._next_generation(ctx, pop, scores, ahead=1)
    share, elite_share = -(-n // lineages), -(-e // lineages)
    held = Counter(got.origin.tolist())
    assert max(held.values()) <= share and len(held) >= min(lineages, 8)
    want_elites = [i for i in range(n) if i % 2 < elite_share][:e]  # the best members, elite_share per lineage
    assert torch.equal(got.ids[:e], pop.ids[want_elites])
    kids = got.select(list(range(e, n)))
    assert bool((kids.parents != -1).all()) and not set(kids.ids.tolist()) & set(pop.ids.tolist())
    plain = evo._winners(ref, 15, n - e, 1).tolist()  # the same draws over the top 90%; rank = index here
    assert ctx.rng.counter == ref.rng.counter
    chosen = [pop.ids.tolist().index(pid) for pid in kids.parents.tolist()]
    assert chosen[0] == plain[0]  # the first winner's lineage has room: the place is its own
    # the rule as documented: a winner keeps its place while its lineage has room, else the place goes to the
    # member at the same rank among the pool's members whose lineage has room (lineage of candidate i: i // 2)
    count, want = Counter(i // 2 for i in want_elites), []
    for w in plain:
        m = w
        if count[m // 2] >= share:
            room = [i for i in range(15) if count[i // 2] < share]
            m = room[w * len(room) // 15]
        count[m // 2] += 1
        want.append(m)
    assert chosen == want


def test_evosearch_uses_only_public_state_operations():
    """No private attribute of State or Streams (``_name``) is read outside their own module."""
    import inspect
    import re

    import mmtts.strategies.evosearch as evo
    src = inspect.getsource(evo)
    assert not re.search(r"\b(State|Streams|pop|new|kids|st|state)\._[a-z]", src)
    with pytest.raises(IndexError, match="out of range for a batch of 4"):
        at_stage_two(image_process(), 4, seed=1).select([4])
