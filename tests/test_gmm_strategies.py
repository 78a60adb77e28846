"""Strategies against closed forms on the analytic Gaussian-mixture diffusion."""

import numpy as np
import pytest
import torch

import mmtts
from mmtts.core import Streams
from mmtts.modalities.toy_gmm import (DEFAULT_MIXTURE, DEFAULT_TARGET, GMMDiffusion, MixtureLogDensity,
                                      QuadraticReward)

MIX = DEFAULT_MIXTURE
REWARD = QuadraticReward(DEFAULT_TARGET)


def run_to_end(p, n, seed):
    st = p.init(Streams.spawn(seed, n))
    while int(st.stage[0]) < p.num_stages:
        st = p.step(st)
    return p.finish(st)


@pytest.mark.parametrize("stages", [1, 5, 20])
def test_exact_sampler_draws_the_mixture(stages):
    x = run_to_end(GMMDiffusion(MIX, stages), 4000, seed=0)
    frac = torch.bincount(MIX.assign(x), minlength=4).double() / len(x)
    # binomial standard error at n = 4000 is <= 0.008; allow 4 of them
    assert torch.allclose(frac, torch.tensor(MIX.weights, dtype=torch.float64), atol=0.032)
    assert float(REWARD.score(x).mean()) == pytest.approx(REWARD.expected_under(MIX), abs=0.45)


def test_ddim_with_exact_denoiser_approximates_the_mixture():
    x = run_to_end(GMMDiffusion(MIX, 50, sampler="ddim", eta=1.0), 3000, seed=1)
    frac = torch.bincount(MIX.assign(x), minlength=4).double() / len(x)
    assert torch.allclose(frac, torch.tensor(MIX.weights, dtype=torch.float64), atol=0.05)


def test_denoiser_is_the_posterior_mean():
    """E[x0 | x_t] from the closed form matches a Monte Carlo estimate over the joint."""
    p = GMMDiffusion(MIX, 10)
    g = torch.Generator().manual_seed(0)
    x0 = MIX.sample(2_000_000, g)
    abar = torch.tensor(0.5, dtype=torch.float64)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    near = ((xt - torch.tensor([-1.0, 0.3], dtype=torch.float64)) ** 2).sum(1) < 0.05 ** 2
    mc, se = x0[near].mean(0), x0[near].std(0) / near.sum().sqrt()
    exact = p.denoise(torch.tensor([[-1.0, 0.3]], dtype=torch.float64), abar.reshape(1))[0]
    assert int(near.sum()) > 300
    assert ((mc - exact).abs() < 4 * se + 0.01).all(), (mc, exact, se)


def test_tilt_is_the_normalised_product():
    tilted = MIX.tilt(DEFAULT_TARGET, width=1.0, lmbda=2.0)
    xs = torch.stack(torch.meshgrid(torch.linspace(-6, 6, 241, dtype=torch.float64),
                                    torch.linspace(-6, 6, 241, dtype=torch.float64), indexing="ij"), -1).reshape(-1, 2)
    logp = MIX.log_prob(xs) + 2.0 * REWARD.score(xs)
    dens = torch.softmax(logp, 0)
    assert torch.allclose(dens, torch.softmax(tilted.log_prob(xs), 0), atol=1e-9)


def test_best_of_n_matches_order_statistics():
    p = GMMDiffusion(MIX, 10)
    n, seeds = 16, 150
    best = [mmtts.search(p, REWARD, "best-of-n", budget=10 * n, seed=s).best_score for s in range(seeds)]
    expected = REWARD.expected_best_of(MIX, n)
    se = np.std(best, ddof=1) / np.sqrt(seeds)
    assert abs(np.mean(best) - expected) < 4 * se, (np.mean(best), expected, se)
    # and the analytic curve really depends on n
    assert REWARD.expected_best_of(MIX, 64) > expected + 0.1


@pytest.mark.parametrize("scheme", ["systematic", "multinomial"])
def test_particle_filter_population_approaches_the_tilted_target(scheme):
    """Mode weights of the final population match p(x) exp(lmbda r(x)) within 0.05 (3 seeds x 600 particles)."""
    lmbda = 1.0
    p = GMMDiffusion(MIX, 20)
    target = torch.tensor(MIX.tilt(DEFAULT_TARGET, 1.0, lmbda).weights, dtype=torch.float64)
    fracs = []
    for seed in range(3):
        r = mmtts.search(p, REWARD, "particle-filter", budget=20 * 600, seed=seed, lmbda=lmbda,
                         potential="diff", resampling=scheme, ess_threshold=0.5)
        fracs.append(torch.bincount(MIX.assign(r.population), minlength=4).double() / 600)
    frac = torch.stack(fracs).mean(0)
    assert torch.allclose(frac, target, atol=0.05), (frac, target)
    # the untilted weights are far away, so the check has teeth
    assert (frac - torch.tensor(MIX.weights, dtype=torch.float64)).abs().max() > 0.2


def test_particle_filter_without_weights_is_best_of_n():
    p = GMMDiffusion(MIX, 10, sampler="ddim")
    pf = mmtts.search(p, REWARD, "particle-filter", n=32, budget=320, seed=4, lmbda=0.0, final_resample=False)
    bon = mmtts.search(p, REWARD, "best-of-n", n=32, budget=320, seed=4)
    assert torch.equal(pf.outputs, bon.outputs) and pf.best_score == bon.best_score
    assert pf.extra["resampled_at"] == []


def test_beam_without_intermediate_selection_is_best_of_n():
    p = GMMDiffusion(MIX, 10)
    beam = mmtts.search(p, REWARD, "beam", beams=4, width=3, interval=10, budget=120, seed=2)
    bon = mmtts.search(p, REWARD, "best-of-n", n=12, budget=120, seed=2)
    assert torch.equal(beam.outputs, bon.outputs)


@pytest.mark.parametrize("potential", ["diff", "max", "add", "rt"])
def test_search_beats_sampling_at_equal_budget(potential):
    p = GMMDiffusion(MIX, 20)
    base = REWARD.expected_best_of(MIX, 1)
    scores = [mmtts.search(p, REWARD, "particle-filter", budget=20 * 16, seed=s, lmbda=10.0,
                           potential=potential).best_score for s in range(4)]
    assert np.mean(scores) > base + 5.0


def test_same_seed_same_result_and_seeds_differ():
    p = GMMDiffusion(MIX, 10)
    for strat in ("best-of-n", "particle-filter", "beam"):
        a = mmtts.search(p, REWARD, strat, budget=160, seed=0, heldout=[MixtureLogDensity(MIX)])
        b = mmtts.search(p, REWARD, strat, budget=160, seed=0, heldout=[MixtureLogDensity(MIX)])
        c = mmtts.search(p, REWARD, strat, budget=160, seed=1)
        untimed = [[{k: v for k, v in e.items() if k != "seconds"} for e in r.trace] for r in (a, b)]
        assert torch.equal(a.outputs, b.outputs) and untimed[0] == untimed[1]
        assert torch.equal(a.heldout["log_density"], b.heldout["log_density"])
        assert not torch.equal(a.outputs, c.outputs)


def test_perturb_and_renoise_scales():
    p = GMMDiffusion(MIX, 10, sampler="ddim")
    st = p.init(Streams.spawn(0, 20000))
    st = p.step(p.step(st))
    moved = p.perturb(st, 1.0)
    d = moved.data["x"] - st.data["x"]
    assert float(d.std()) == pytest.approx(float(p.step_sigma(st.stage[:1])), rel=0.03)
    back = p.renoise(st, 2)
    assert int(back.stage[0]) == 0
    assert float(back.data["x"].std()) == pytest.approx(1.0, abs=0.02)  # abar = 0 at the start: pure noise


@pytest.mark.parametrize("strategy, kw", [("zero-order", {}), ("paths", {}), ("paths", {"width": 2, "start": 0.5}),
                                          ("evosearch", {}), ("evosearch", {"n": 3, "elites": 0})])
@pytest.mark.parametrize("budget", [10, 47, 200])
def test_new_strategies_stay_within_budget(strategy, kw, budget):
    p = GMMDiffusion(MIX, 10, sampler="ddim", eta=0.0)
    try:
        r = mmtts.search(p, REWARD, strategy, budget=budget, seed=0, **kw)
    except mmtts.BudgetError as e:
        assert strategy == "paths" and "pays for 0 path" in str(e)
        return
    assert 10 <= r.budget["nfe"] <= budget


def test_paths_from_the_last_stage_is_best_of_n():
    p = GMMDiffusion(MIX, 10, sampler="ddim", eta=0.0)
    a = mmtts.search(p, REWARD, "paths", n=6, start=1.0, budget=60, seed=5)
    b = mmtts.search(p, REWARD, "best-of-n", n=6, budget=60, seed=5)
    assert torch.equal(a.outputs, b.outputs) and a.extra["rounds"] == 0


def test_evosearch_schedule_grows_with_budget_and_mutates():
    p = GMMDiffusion(MIX, 10, sampler="ddim", eta=0.0)
    small = mmtts.search(p, REWARD, "evosearch", n=4, budget=40, seed=0)
    big = mmtts.search(p, REWARD, "evosearch", n=4, budget=400, seed=0)
    assert small.extra["generations"] == 1 and small.extra["stages"] == []
    # 4 initial (40 NFE), the trajectory phase from stage 1 (4 x 9 NFE), noise generations of 3 children in the rest
    assert big.extra["stages"] == list(range(1, 10)) and big.extra["noise_generations"] == 1 + (400 - 40 - 36) // 30
    assert big.best_score >= small.best_score  # the archive only grows
    with pytest.raises(mmtts.BudgetError, match="noise generation"):
        mmtts.search(p, REWARD, "evosearch", n=4, noise_generations=30, budget=100, seed=0)
    with pytest.raises(ValueError, match="increasing"):
        mmtts.create_strategy("evosearch", stages=[0, 3])


def test_evosearch_population_of_one_has_no_trajectory_generations():
    """One candidate per generation leaves nothing to select: no per-stage scoring, no random walk."""
    p = GMMDiffusion(MIX, 10, sampler="ddim", eta=0.0)
    one = mmtts.search(p, REWARD, "evosearch", n=1, noise_generations=0, budget=10, seed=4)
    bon = mmtts.search(p, REWARD, "best-of-n", n=1, budget=10, seed=4)
    assert torch.equal(one.outputs, bon.outputs) and one.extra["stages"] == []
    assert one.budget["verifier_calls"] == 1 and one.budget["nfe"] == 10
    # with noise generations the archive still selects across them
    archive = mmtts.search(p, REWARD, "evosearch", n=1, budget=50, seed=4)
    assert archive.extra["stages"] == [] and archive.extra["noise_generations"] == 5
    with pytest.raises(ValueError, match="n >= 2"):
        mmtts.search(p, REWARD, "evosearch", n=1, stages=[3], budget=50, seed=4)
    with pytest.raises(mmtts.BudgetError, match="at least 10"):
        mmtts.search(p, REWARD, "evosearch", n=1, noise_generations=0, budget=5, seed=4)


@pytest.mark.parametrize("kw", [{"noise_generations": 0}, {"noise_generations": 0, "initial": 12, "stages": [2, 5]},
                                {}, {"noise_generations": 2, "stages": [4, 8]}])
def test_evosearch_costs_what_its_plan_says_and_answers_the_best_ever_seen(kw):
    p = GMMDiffusion(MIX, 10, sampler="ddim", eta=0.0)
    r = mmtts.search(p, REWARD, "evosearch", n=6, budget=300, seed=1, **kw)
    x = r.extra
    first = x["stages"][0]
    P, kids = 6, 6 - 6 // 4
    if x["noise_generations"] == 0:
        nfe, calls = x["initial"] * first + P * (10 - first), x["initial"] + P * len(x["stages"])
    else:
        nfe = x["initial"] * 10 + (x["noise_generations"] - 1) * kids * 10 + P * (10 - first)
        calls = x["initial"] + (x["noise_generations"] - 1) * kids + P * len(x["stages"])
    assert r.budget["nfe"] == nfe <= 300 and r.budget["verifier_calls"] == calls
    finished = [s for e in r.trace for s in e["scores"]]
    assert r.best_score == pytest.approx(max(finished))  # every finished candidate is in the archive


def test_evosearch_trajectory_mutation_is_applied_before_the_step():
    """A child's latent at its evolution stage is the parent's plus latent_scale * sigma_t * eps."""
    from mmtts.strategies.evosearch import EvoSearch
    p = GMMDiffusion(MIX, 10, sampler="ddim", eta=0.0)
    st = p.step(p.step(p.init(Streams.spawn(0, 4000))))
    kid = p.perturb(st, 0.5)
    d = kid.data["x"] - st.data["x"]
    assert float(d.std()) == pytest.approx(0.5 * float(p.ancestral_sigma(st.stage[:1])), rel=0.03)
    # scale 0: the trajectory phase only selects, so with a deterministic sampler every final output is one
    # of the candidates that reached the first evolution stage, carried on unchanged
    r = mmtts.search(p, REWARD, EvoSearch(n=5, noise_generations=0, latent_scale=0.0, stages=[3, 6]),
                     budget=60, seed=2)
    plain = run_to_end(p, 5, seed=2)
    assert any(torch.allclose(r.outputs[0], y) for y in plain)


def test_zero_order_resamples_the_pivot_when_no_neighbour_improves():
    from mmtts.core import FunctionVerifier
    p = GMMDiffusion(MIX, 5, sampler="ddim", eta=0.0)
    flat = FunctionVerifier(lambda x: torch.zeros(len(x), dtype=torch.float64), name="flat")  # nothing improves
    budget = 5 * (1 + 3 * 4)
    r = mmtts.search(p, flat, "zero-order", neighbours=3, budget=budget, seed=0)
    # four iterations: neighbours (none better), fresh noises (the best is the new pivot), neighbours, fresh
    assert r.extra == {"moves": 0, "restarts": 2} and r.budget["nfe"] == budget
    stay = mmtts.search(p, flat, "zero-order", neighbours=3, restart=False, budget=budget, seed=0)
    assert stay.extra == {"moves": 0, "restarts": 0}


def test_evosearch_population_is_the_deprecated_name_of_n():
    p = GMMDiffusion(MIX, 10, sampler="exact")
    with pytest.warns(DeprecationWarning, match="pass n="):
        old = mmtts.search(p, REWARD, "evosearch", population=4, budget=120, seed=2)
    new = mmtts.search(p, REWARD, "evosearch", n=4, budget=120, seed=2)
    assert torch.equal(old.outputs, new.outputs) and old.settings == new.settings and new.settings["n"] == 4
