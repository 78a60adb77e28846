"""Bad input to the search side is refused at the door with an MmttsError naming the problem and the fix."""

import math

import pytest
import torch

import mmtts
from mmtts.core import FunctionVerifier, MmttsError, Process, State, Verifier
from mmtts.core.errors import ProcessError, SettingsError
from mmtts.core.strategy import run_strategy
from mmtts.modalities.toy_gmm import DEFAULT_MIXTURE, DEFAULT_TARGET, GMMDiffusion, QuadraticReward
from mmtts.strategies.best_of_n import BestOfN

REWARD = QuadraticReward(DEFAULT_TARGET)


class Counting(Verifier):
    name = "counting"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def score(self, outputs, context=None):
        self.calls += 1
        return outputs.sum(1).double()


class Broken(Process):
    """Two stages over one number per candidate; ``wrong`` names the method that returns one item too few."""

    num_stages = 2
    decodes_on_finish = True

    def __init__(self, wrong):
        self.wrong = wrong

    def init(self, streams, first_index=0):
        state = State.fresh({"x": streams.randn((1,), dtype=torch.float64)}, streams, first_index)
        return state.select(list(range(len(state) - 1))) if self.wrong == "init" else state

    def step(self, state):
        out = state.replace(x=state.data["x"] + 1)
        out.stage = state.stage + 1
        return out.select([0]) if self.wrong == "step" and len(state) > 1 else out

    def finish(self, state):
        x = state.data["x"]
        return {"finish": x[:1], "dict": {"a": x, "b": x[:1]}, "str": "oops"}.get(self.wrong, x)

    def preview(self, state):
        return state.data["x"][:1] if self.wrong == "preview" else state.data["x"]


@pytest.mark.parametrize("wrong, strategy, match", [
    ("finish", "best-of-n", r"Broken.finish\(\) returned 1 output\(s\) for 10 candidates"),
    ("preview", "particle-filter", r"Broken.preview\(\) returned 1 output\(s\) for 10 candidates"),
    ("init", "best-of-n", r"Broken.init\(\) returned 9 candidates for 10 streams"),
    ("step", "best-of-n", r"Broken.step\(\) returned 1 candidates for 10 candidates"),
    ("dict", "best-of-n", r"Broken.finish\(\) returned an output batch mmtts cannot read"),
    ("str", "best-of-n", r"Broken.finish\(\) returned an output batch mmtts cannot read"),
])
def test_a_process_returning_the_wrong_count_is_refused_before_scoring(wrong, strategy, match):
    v = Counting()
    with pytest.raises(ProcessError, match=match):
        mmtts.search(Broken(wrong), v, strategy, n=10, budget=20, seed=0)
    assert v.calls == 0  # nothing was scored


def test_the_wrong_count_is_not_charged():
    from mmtts.core.strategy import SearchContext
    ctx = SearchContext(Broken("finish"), Counting(), mmtts.Budget(max_nfe=100), seed=0)
    state = ctx.advance(ctx.fresh(10))
    with pytest.raises(ProcessError):
        ctx.finish(state)
    assert ctx.meter.decodes == 0 and ctx.meter.verifier_calls == 0 and ctx.meter.nfe == 20


class SlowMutations(Broken):
    """Perturb and renoise take a known time; ``wrong`` makes one of them drop a candidate."""

    def perturb(self, state, scale):
        import time
        time.sleep(0.02)
        out = state.replace(x=state.data["x"] + scale)
        return out.select([0]) if self.wrong == "perturb" else out

    def renoise(self, state, stages):
        import time
        time.sleep(0.02)
        return state.select([0]) if self.wrong == "renoise" else state


def test_mutations_run_on_the_model_clock_and_are_checked():
    from mmtts.core.strategy import SearchContext
    ctx = SearchContext(SlowMutations(None), Counting(), mmtts.Budget(max_nfe=100), seed=0)
    state = ctx.advance(ctx.fresh(4), 1)
    before = ctx.meter.seconds["model"]
    moved = ctx.renoise(ctx.perturb(state, 1.0), 1)
    assert torch.equal(moved.data["x"], state.data["x"] + 1.0)
    assert ctx.meter.seconds["model"] - before >= 0.04  # both calls on the model clock
    assert ctx.meter.nfe == 4  # a mutation is not a model forward: nothing charged
    for wrong in ("perturb", "renoise"):
        ctx = SearchContext(SlowMutations(wrong), Counting(), mmtts.Budget(max_nfe=100), seed=0)
        state = ctx.advance(ctx.fresh(4), 1)
        with pytest.raises(ProcessError, match=rf"SlowMutations.{wrong}\(\) returned 1 candidates for 4"):
            ctx.perturb(state, 1.0) if wrong == "perturb" else ctx.renoise(state, 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), -1.0, "10", True])
def test_particle_filter_lmbda_must_be_finite_and_non_negative(bad):
    with pytest.raises(SettingsError, match=r"particle-filter lmbda=.* must be a finite number in \[0.0, inf\]"):
        mmtts.create_strategy("particle-filter", lmbda=bad)


@pytest.mark.parametrize("strategy, setting, value", [
    ("best-of-n", "n", 0), ("best-of-n", "n", 2.5), ("best-of-n", "batch_size", float("nan")),
    ("best-of-n", "keep", True), ("beam", "beams", -1), ("beam", "width", float("inf")), ("beam", "interval", 0),
    ("particle-filter", "ess_threshold", float("nan")), ("particle-filter", "ess_threshold", 1.5),
    ("particle-filter", "n", -3), ("particle-filter", "interval", 1.5), ("particle-filter", "final_resample", "no"),
    ("particle-filter", "potential", "dif"), ("particle-filter", "resampling", None),
    ("zero-order", "radius", float("nan")), ("zero-order", "radius", 0.0), ("zero-order", "neighbours", 0),
    ("zero-order", "restart", 2), ("paths", "start", float("nan")), ("paths", "start", 2.0), ("paths", "width", 0),
    ("paths", "forward", 0), ("evosearch", "noise_beta", float("nan")), ("evosearch", "archive_fraction", 0.0),
    ("evosearch", "latent_scale", -1.0), ("evosearch", "latent_scale", float("inf")), ("evosearch", "n", 0),
    ("evosearch", "tournament", 1.5), ("evosearch", "noise_generations", -1), ("evosearch", "elites", -1),
    ("evosearch", "stages", [2, 1]), ("evosearch", "stages", "12"), ("evosearch", "stages", [0.5]),
])
def test_meaningless_numeric_settings_are_refused_naming_the_setting(strategy, setting, value):
    with pytest.raises(SettingsError) as e:
        mmtts.create_strategy(strategy, **{setting: value})
    assert setting in str(e.value) and isinstance(e.value, MmttsError)


def test_whole_floats_are_accepted_as_whole_numbers():
    s = mmtts.create_strategy("best-of-n", n=4.0, batch_size=2)
    assert s.n == 4 and isinstance(s.n, int) and s.settings["n"] == 4


def test_a_misspelt_setting_lists_the_valid_ones():
    p = GMMDiffusion(DEFAULT_MIXTURE, 4)
    with pytest.raises(SettingsError, match=r"strategy 'particle-filter' has no setting 'lmda' \(did you mean "
                                            r"'lmbda'\?\); its settings are: n, potential, lmbda"):
        mmtts.search(p, REWARD, "particle-filter", budget=40, lmda=1.0)
    with pytest.raises(SettingsError, match="has no setting 'beam'.*beams"):
        mmtts.create_strategy("beam", beam=2)
    with pytest.raises(SettingsError, match="takes its settings by name"):
        BestOfN(4, 64, 1, 2)


@pytest.mark.parametrize("seed", [2 ** 64, 2 ** 63, -1, 1.5, True, "0", None])
def test_seeds_that_would_collide_are_refused(seed):
    p = GMMDiffusion(DEFAULT_MIXTURE, 4)
    with pytest.raises(MmttsError, match="seed"):
        run_strategy(BestOfN(n=2), p, REWARD, 40, seed=seed)


def test_not_a_process_and_not_a_verifier():
    with pytest.raises(MmttsError, match="must be an mmtts Process"):
        run_strategy(BestOfN(n=2), object(), REWARD, 40)
    with pytest.raises(MmttsError, match="scoring function, not int"):
        run_strategy(BestOfN(n=2), GMMDiffusion(DEFAULT_MIXTURE, 4), 3, 40)


def test_an_unreadable_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "run.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(MmttsError, match="cannot be read.*delete it"):
        mmtts.search(GMMDiffusion(DEFAULT_MIXTURE, 4), REWARD, "best-of-n", budget=40, checkpoint=bad, resume=True)


def test_settings_checks_keep_valid_values():
    assert math.isclose(mmtts.create_strategy("particle-filter", lmbda=0).lmbda, 0.0)
    assert mmtts.create_strategy("evosearch", n=4, stages=(1, 3)).stages == [1, 3]


def test_particle_filter_weights_stay_defined_at_the_edges():
    p = GMMDiffusion(DEFAULT_MIXTURE, 3)
    nan = FunctionVerifier(lambda x: torch.full((len(x),), float("nan")), name="nan")
    with pytest.warns(RuntimeWarning):  # ranked last, then resampled uniformly
        r = mmtts.search(p, nan, "particle-filter", n=4, budget=12, lmbda=0.0)
    assert r.best_score == float("-inf") and len(r.population) == 4
    big = FunctionVerifier(lambda x: 1e300 * (100.0 + REWARD.score(x)), name="big")
    r = mmtts.search(p, big, "particle-filter", n=4, budget=12, lmbda=1e308, ess_threshold=1.0)
    assert math.isfinite(r.best_score) and r.extra["resampled_at"][-1] == 3
    assert all(1.0 <= e <= 4.0 for e in r.extra["ess"])


@pytest.mark.parametrize("strategy, setting", [("particle-filter", "n"), ("beam", "width"), ("paths", "n")])
def test_a_population_sized_by_the_budget_alone_is_capped(strategy, setting):
    p = GMMDiffusion(DEFAULT_MIXTURE, 4)
    with pytest.raises(mmtts.BudgetError, match=f"past the 65536 it sizes by itself; pass {setting}="):
        mmtts.search(p, REWARD, strategy, budget=10 ** 9)
