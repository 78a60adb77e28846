"""EvoSearch's one-pass next trajectory generation equals its definition: elites, then perturbed forked children."""

import pytest
import torch
from diffusers import DDIMScheduler

from mmtts.core import Budget, FunctionVerifier, State, Streams
from mmtts.core.strategy import SearchContext
from mmtts.modalities.image import ImageProcess, schedule_from_scheduler
from mmtts.modalities.toy_gmm import DEFAULT_MIXTURE, GMMDiffusion
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


@pytest.mark.parametrize("make", [image_process, lambda: GMMDiffusion(DEFAULT_MIXTURE, 6, sampler="ddim", eta=0.0),
                                  lambda: RebuildingProcess(num_stages=5)])
@pytest.mark.parametrize("population,elites", [(2, None), (6, None), (6, 2), (5, 0)])
def test_next_generation_equals_select_resample_perturb_cat(make, population, elites):
    p = make()
    evo = EvoSearch(n=population, elites=elites, noise_generations=0, latent_scale=0.5)
    pop = at_stage_two(p, population, seed=4)
    before = [t.clone() for t in fields(pop)]
    scores = torch.tensor([0.5, -1.0, 0.5, float("-inf"), 2.0, 0.5][:population], dtype=torch.float64)  # ties
    ref_ctx, ctx = (SearchContext(p, FLAT, Budget(max_nfe=10 ** 6), seed=9) for _ in range(2))
    for ahead in (3, 2, 1):
        ranked = top_k(scores, len(scores))
        elite = ranked[: min(evo.elites, evo.P - 1)]
        parents = evo._tournament(ref_ctx, scores, evo.P - len(elite), ranked, ahead=ahead)
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


def test_evosearch_uses_only_public_state_operations():
    """No private attribute of State or Streams (``_name``) is read outside their own module."""
    import inspect
    import re

    import mmtts.strategies.evosearch as evo
    src = inspect.getsource(evo)
    assert not re.search(r"\b(State|Streams|pop|new|kids|st|state)\._[a-z]", src)
    with pytest.raises(IndexError, match="out of range for a batch of 4"):
        at_stage_two(image_process(), 4, seed=1).select([4])
