"""Budget.max_seconds: every strategy stops at the deadline and returns the best finished candidate, flagged."""

import time

import pytest
import torch

import mmtts
from mmtts.core import Budget, Verifier
from mmtts.modalities.toy_gmm import DEFAULT_MIXTURE, DEFAULT_TARGET, GMMDiffusion, QuadraticReward

REWARD = QuadraticReward(DEFAULT_TARGET)


class SlowReward(Verifier):
    """The toy reward, ``delay`` seconds per call."""

    name = "slow"

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    def score(self, outputs, context=None):
        time.sleep(self.delay)
        return REWARD.score(outputs)


STRATEGIES = [("best-of-n", {}), ("beam", {"beams": 2}), ("particle-filter", {}), ("zero-order", {}),
              ("paths", {"width": 2}), ("evosearch", {"n": 4})]


@pytest.mark.parametrize("strategy, kw", STRATEGIES)
def test_every_strategy_returns_at_the_deadline_with_the_best_finished_candidate(strategy, kw):
    p = GMMDiffusion(DEFAULT_MIXTURE, 10, sampler="exact")
    t0 = time.perf_counter()
    # every strategy scores at least 10 times here: 1 s of verifier time alone, far past the deadline
    r = mmtts.search(p, SlowReward(0.1), strategy, budget=Budget(max_nfe=100_000, max_seconds=0.3), seed=1,
                     keep=2, **kw)
    wall = time.perf_counter() - t0
    assert r.stopped == "deadline" and r.deadline_hit
    assert r.budget["stopped"] == "deadline" and r.summary()["stopped"] == "deadline"
    assert wall < 0.3 + 1.0  # the deadline, then at most one stage, one verifier call and one candidate's finish
    assert r.budget["nfe"] < 100_000 and r.budget["seconds"]["wall"] >= 0.3
    assert r.outputs.shape[1] == 2 and 1 <= len(r.outputs) <= 2
    assert torch.equal(r.scores, REWARD(r.outputs))  # finished outputs, with their own scores
    finished = torch.tensor([s for e in r.trace for s in e["scores"]], dtype=torch.float64)
    assert float(r.scores[0]) == float(finished.max())  # the best candidate finished before the deadline


@pytest.mark.parametrize("strategy, kw", STRATEGIES)
def test_a_deadline_that_never_strikes_changes_nothing(strategy, kw):
    p = GMMDiffusion(DEFAULT_MIXTURE, 10, sampler="exact")
    a = mmtts.search(p, REWARD, strategy, budget=Budget(max_nfe=200), seed=2, **kw)
    b = mmtts.search(p, REWARD, strategy, budget=Budget(max_nfe=200, max_seconds=600.0), seed=2, **kw)
    assert b.stopped is None and not b.deadline_hit and b.budget["stopped"] is None
    assert torch.equal(a.outputs, b.outputs) and torch.equal(a.scores, b.scores) and a.extra == b.extra
    assert all(torch.equal(a.lineage[k], b.lineage[k]) for k in a.lineage)


def test_with_nothing_finished_one_candidate_runs_to_the_end():
    """A particle filter stopped mid-way finishes only the particle with the best latest preview score."""
    T = 80  # 80 preview scores of 10 ms each: far past the deadline
    p = GMMDiffusion(DEFAULT_MIXTURE, T, sampler="exact")
    r = mmtts.search(p, SlowReward(0.01), "particle-filter", n=8, budget=Budget(max_seconds=0.2), seed=3)
    assert r.stopped == "deadline" and len(r.outputs) == 1 and len(r.trace) == 1 and len(r.trace[0]["scores"]) == 1
    steps = (r.budget["nfe"] - T) // 7  # 8 particles per stage until the deadline, then one to the end
    assert 0 < steps < T and r.budget["nfe"] == 8 * steps + (T - steps)
    assert r.budget["verifier_calls"] == 8 * steps + 1  # the previews, then the one finished candidate
    assert torch.equal(r.scores, REWARD(r.outputs))


def test_time_only_budgets():
    p = GMMDiffusion(DEFAULT_MIXTURE, 6, sampler="exact")
    for strategy, kw in [("evosearch", {"n": 4}), ("zero-order", {}), ("best-of-n", {"batch_size": 8}),
                         ("paths", {"n": 2}), ("particle-filter", {"n": 4}), ("beam", {"beams": 2, "width": 2}),
                         ("evosearch", {"n": 4, "noise_generations": 2, "stages": [2, 4]})]:
        r = mmtts.search(p, SlowReward(0.001), strategy, budget=Budget(max_seconds=0.15), seed=0, **kw)
        assert len(r.outputs) >= 1 and torch.equal(r.scores, REWARD(r.outputs))
        if strategy in ("evosearch", "zero-order", "best-of-n") and "stages" not in kw:
            assert r.stopped == "deadline"  # they run until the deadline
    with pytest.raises(mmtts.BudgetError, match="noise_generations="):
        mmtts.search(p, REWARD, "evosearch", n=4, stages=[2], budget=Budget(max_seconds=1.0))
    with pytest.raises(mmtts.BudgetError, match="pass n="):
        mmtts.search(p, REWARD, "paths", budget=Budget(max_seconds=1.0))
    with pytest.raises(mmtts.BudgetError, match="cap to size"):
        mmtts.search(p, REWARD, "beam", budget=Budget(max_seconds=1.0))


def test_stopped_is_the_only_field_and_deadline_hit_reads_it():
    p = GMMDiffusion(DEFAULT_MIXTURE, 4, sampler="exact")
    r = mmtts.search(p, REWARD, "best-of-n", budget=Budget(max_nfe=16, max_seconds=600.0), seed=0)
    assert r.stopped is None and r.deadline_hit is False
    r.stopped = "deadline"
    assert r.deadline_hit is True
    with pytest.raises(AttributeError):
        r.deadline_hit = False  # read-only: set ``stopped``


def test_stopped_travels_in_checkpoints(tmp_path):
    from mmtts.core.budget import Meter
    m = Meter(Budget(max_seconds=1.0))
    m.stopped = "deadline"
    m2 = Meter(Budget(max_seconds=1.0))
    m2.load_state_dict(m.state_dict())
    assert m2.stopped == "deadline" and m2.report()["stopped"] == "deadline"
    old = {k: v for k, v in m.state_dict().items() if k != "stopped"}  # a checkpoint written before the field
    m3 = Meter(Budget(max_seconds=1.0))
    m3.load_state_dict(old)
    assert m3.stopped is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 0, True, "1"])
def test_non_finite_or_meaningless_deadlines_are_refused(bad):
    with pytest.raises(mmtts.BudgetError, match="max_seconds"):
        Budget(max_nfe=10, max_seconds=bad)
