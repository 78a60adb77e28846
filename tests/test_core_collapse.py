"""Beam and particle filtering on deterministic schedules: no silent collapse into copies of one trajectory."""

import warnings

import numpy as np
import pytest
import torch

import mmtts
from mmtts.core import MmttsError, Process
from mmtts.core.errors import CollapseWarning
from mmtts.modalities.toy_gmm import DEFAULT_MIXTURE as MIX
from mmtts.modalities.toy_gmm import DEFAULT_TARGET, GMMDiffusion, QuadraticReward

REWARD = QuadraticReward(DEFAULT_TARGET)


class Undeclared(GMMDiffusion):
    """The toy sampler with its stochasticity left undeclared, as a third-party process would be."""

    def is_stochastic(self, stage):
        return None


def test_the_toy_sampler_declares_which_steps_draw_noise():
    T = 6
    assert [GMMDiffusion(MIX, T, sampler="exact").is_stochastic(t) for t in range(T)] == [True] * T
    assert [GMMDiffusion(MIX, T, sampler="ddim", eta=0.0).is_stochastic(t) for t in range(T)] == [False] * T
    # at eta = 1 every step draws but the last, whose posterior std is 0
    assert [GMMDiffusion(MIX, T, sampler="ddim", eta=1.0).is_stochastic(t) for t in range(T)] == [True] * 5 + [False]
    p = GMMDiffusion(MIX, T, sampler="ddim", eta=1.0)
    assert p.forks_diverge(T - 2) is True and p.forks_diverge(T - 1) is False and p.forks_diverge(T) is False
    assert Undeclared(MIX, T, sampler="ddim", eta=0.0).forks_diverge(1) is None
    with pytest.raises(ValueError, match="eta"):
        GMMDiffusion(MIX, T, sampler="ddim", eta=float("nan"))


@pytest.mark.parametrize("strategy", ["beam", "particle-filter"])
def test_a_fully_deterministic_schedule_is_refused_naming_the_fix(strategy):
    p = GMMDiffusion(MIX, 10, sampler="ddim", eta=0.0)
    with pytest.raises(MmttsError, match=r"GMMDiffusion draws no fresh noise.*eta > 0.*fork='perturb'"):
        mmtts.search(p, REWARD, strategy, budget=400, seed=0)


def test_beam_skips_the_selection_before_a_deterministic_last_step():
    p = GMMDiffusion(MIX, 10, sampler="ddim", eta=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        r = mmtts.search(p, REWARD, "beam", beams=4, budget=400, seed=0)
    assert r.extra["points"] == list(range(1, 9))  # stage 9 is dropped: its children could never differ
    width = r.extra["width"]
    assert r.extra["distinct"] == 4 * width == len(r.population)


def test_particle_filter_does_not_resample_into_copies_that_cannot_diverge():
    p = GMMDiffusion(MIX, 10, sampler="ddim", eta=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        r = mmtts.search(p, REWARD, "particle-filter", n=40, budget=400, seed=0, ess_threshold=1.0)
    assert 9 not in r.extra["resampled_at"] and r.extra["resampled_at"][-1] == 10  # the final resampling stays
    assert r.extra["distinct"] == 40
    # the answer is the best finished particle, before the final resampling copied some of them
    assert r.best_score >= float(r.population_scores.max())


@pytest.mark.parametrize("strategy", ["beam", "particle-filter"])
def test_fork_perturb_searches_a_deterministic_schedule_and_beats_best_of_n(strategy):
    p = GMMDiffusion(MIX, 10, sampler="ddim", eta=0.0)
    scores, bon = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        for seed in range(6):
            r = mmtts.search(p, REWARD, strategy, budget=400, seed=seed, fork="perturb")
            assert r.extra["distinct"] == 40
            scores.append(r.best_score)
            bon.append(mmtts.search(p, REWARD, "best-of-n", budget=400, seed=seed).best_score)
    assert np.mean(scores) > np.mean(bon) + 0.1, (np.mean(scores), np.mean(bon))
    again = mmtts.search(p, REWARD, strategy, budget=400, seed=5, fork="perturb")
    assert torch.equal(again.outputs, r.outputs)  # same seed, same result


@pytest.mark.parametrize("strategy", ["beam", "particle-filter"])
def test_an_undeclared_deterministic_process_warns_after_collapsing(strategy):
    p = Undeclared(MIX, 10, sampler="ddim", eta=0.0)
    with pytest.warns(CollapseWarning, match=r"distinct outputs among 40 candidates.*fork='perturb'"):
        r = mmtts.search(p, REWARD, strategy, budget=400, seed=0)
    assert r.extra["distinct"] < 40


def test_fork_perturb_needs_a_process_that_can_perturb():
    class NoPerturb(GMMDiffusion):
        perturb = Process.perturb

    with pytest.raises(MmttsError, match=r"NoPerturb.perturb\(\)"):
        mmtts.search(NoPerturb(MIX, 5, sampler="ddim", eta=0.0), REWARD, "beam", budget=100, fork="perturb")
    with pytest.raises(MmttsError, match="beam unknown fork 'nosie'; choose one of .*did you mean 'noise'"):
        mmtts.search(NoPerturb(MIX, 5), REWARD, "beam", budget=100, fork="nosie")


def _tiny_image_process(eta):
    from diffusers import DDIMScheduler

    from image_fixtures import tiny_unet
    from mmtts.modalities.image import ImageProcess

    return ImageProcess(tiny_unet(), _schedule(DDIMScheduler(num_train_timesteps=100), eta), (1, 8, 8))


def _schedule(sched, eta):
    from mmtts.modalities.image import schedule_from_scheduler
    return schedule_from_scheduler(sched, 4, update="ddim", eta=eta)


def test_on_a_tiny_image_process():
    pytest.importorskip("diffusers")
    assert [_tiny_image_process(1.0).is_stochastic(t) for t in range(4)] == [True, True, True, False]
    assert not any(_tiny_image_process(0.0).is_stochastic(t) for t in range(4))
    mean = mmtts.core.FunctionVerifier(lambda x: x.mean((1, 2, 3)), name="brightness")
    with pytest.raises(MmttsError, match=r"ImageProcess draws no fresh noise.*eta > 0"):
        mmtts.search(_tiny_image_process(0.0), mean, "beam", beams=2, budget=4 * 8, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        r = mmtts.search(_tiny_image_process(0.0), mean, "beam", beams=2, budget=4 * 8, seed=0, fork="perturb")
        assert r.extra["distinct"] == 8
        r = mmtts.search(_tiny_image_process(1.0), mean, "beam", beams=2, budget=4 * 8, seed=0)
        assert r.extra["points"] == [1, 2] and r.extra["distinct"] == 8  # DDIM's last step adds no noise
