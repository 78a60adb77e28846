import pytest
import torch

import mmtts
from mmtts.core import Budget, BudgetError, BudgetExceeded

from helpers import CountingProcess, SumVerifier


@pytest.mark.parametrize("kwargs, msg", [
    ({"max_nfe": 0}, "must be positive"),
    ({"max_nfe": -3}, "must be positive"),
    ({"max_nfe": 2.5}, "whole number"),
    ({}, "at least one cap"),
    ({"max_seconds": 0}, "max_seconds"),
    ({"max_seconds": -1.0}, "max_seconds=-1.0 must be a finite number of seconds > 0"),
    ({"max_seconds": float("nan")}, "max_seconds=nan must be a finite number"),
    ({"max_seconds": float("inf")}, "max_seconds=inf must be a finite number"),
    ({"max_nfe": float("inf")}, "whole number"),
    ({"max_nfe": float("nan")}, "whole number"),
])
def test_invalid_budgets(kwargs, msg):
    with pytest.raises(BudgetError, match=msg):
        Budget(**kwargs)


def test_budget_below_one_candidate_is_a_clear_error():
    p = CountingProcess(num_stages=4, nfe_per_stage=2)
    with pytest.raises(BudgetError, match=r"below the cost of one candidate \(8 NFE"):
        mmtts.search(p, SumVerifier(), "best-of-n", budget=7)


def test_n_zero_and_n_over_budget():
    p = CountingProcess(num_stages=4)
    with pytest.raises(ValueError, match="n >= 1"):
        mmtts.search(p, SumVerifier(), "best-of-n", budget=40, n=0)
    with pytest.raises(BudgetError, match="pays for 10 candidate"):
        mmtts.search(p, SumVerifier(), "best-of-n", budget=40, n=11)
    with pytest.raises(ValueError, match="n >= 1"):
        mmtts.search(p, SumVerifier(), "particle-filter", budget=40, n=0)


@pytest.mark.parametrize("strategy, kw", [("best-of-n", {}), ("particle-filter", {}), ("beam", {"beams": 2}),
                                          ("best-of-n", {"batch_size": 3})])
@pytest.mark.parametrize("budget", [8, 33, 100])
def test_strategies_never_exceed_and_nearly_spend_the_budget(strategy, kw, budget):
    p = CountingProcess(num_stages=4, nfe_per_stage=2)  # a guided process: 2 forwards per stage
    if strategy == "beam" and budget < 16:
        with pytest.raises(BudgetError):
            mmtts.search(p, SumVerifier(), strategy, budget=budget, **kw)
        return
    r = mmtts.search(p, SumVerifier(), strategy, budget=budget, **kw)
    assert r.budget["nfe"] <= budget
    assert r.budget["nfe"] > budget - 8 * (2 if strategy == "beam" else 1)
    assert r.budget["nfe"] % 8 == 0  # whole candidates at 2 NFE per stage


def test_verifier_call_cap_is_respected():
    p = CountingProcess(num_stages=4)
    b = Budget(max_nfe=400, max_verifier_calls=5)
    r = mmtts.search(p, SumVerifier(), "best-of-n", budget=b)
    assert r.budget["verifier_calls"] == 5 and r.budget["nfe"] == 20
    b = Budget(max_nfe=400, max_verifier_calls=12)
    r = mmtts.search(p, SumVerifier(), "particle-filter", budget=b)  # 4 scores per particle
    assert r.budget["verifier_calls"] == 12 and r.extra["n"] == 3


def test_report_splits_time():
    r = mmtts.search(CountingProcess(), SumVerifier(), "best-of-n", budget=40)
    sec = r.budget["seconds"]
    assert set(sec) == {"model", "verifier", "decode", "overhead", "wall"}
    assert sec["wall"] >= sec["model"] + sec["verifier"] - 1e-6
    assert sec["overhead"] >= 0


def test_context_refuses_work_past_the_cap():
    from mmtts.core.strategy import SearchContext
    p = CountingProcess(num_stages=4)
    ctx = SearchContext(p, SumVerifier(), Budget(max_nfe=8), seed=0)
    st = ctx.advance(ctx.fresh(2))
    assert ctx.meter.nfe == 8
    with pytest.raises(BudgetExceeded, match="size their schedules"):
        ctx.step(ctx.fresh(1))
    with pytest.raises(mmtts.MmttsError, match="already completed"):
        ctx.step(st)


def test_time_limited_best_of_n_stops_at_the_deadline():
    r = mmtts.search(CountingProcess(), SumVerifier(), "best-of-n", budget=Budget(max_seconds=0.05), batch_size=4)
    assert r.deadline_hit and r.budget["stopped"] == "deadline" and r.budget["max_seconds"] == 0.05
    finished = sum(len(e["scores"]) for e in r.trace)
    assert finished >= 4 and finished % 4 == 0
    assert r.budget["verifier_calls"] == finished


def test_a_budget_is_immutable_and_reusable():
    b = Budget(max_nfe=200)
    with pytest.raises(AttributeError):
        b.max_nfe = 10
    from mmtts.modalities.toy_gmm import DEFAULT_MIXTURE, DEFAULT_TARGET, GMMDiffusion, QuadraticReward
    p, reward = GMMDiffusion(DEFAULT_MIXTURE, 8, sampler="exact"), QuadraticReward(DEFAULT_TARGET)
    for strategy, kw in [("best-of-n", {"batch_size": 7}), ("particle-filter", {}), ("beam", {"beams": 2}),
                         ("evosearch", {"n": 4}), ("zero-order", {}), ("paths", {"width": 2})]:
        first = mmtts.search(p, reward, strategy, budget=b, seed=3, **kw)
        second = mmtts.search(p, reward, strategy, budget=b, seed=3, **kw)
        assert torch.equal(first.outputs, second.outputs) and torch.equal(first.scores, second.scores)
        assert first.budget["nfe"] == second.budget["nfe"] > 0 and first.budget["nfe"] <= 200
        assert first.trace == [dict(e, seconds=f["seconds"]) for e, f in zip(second.trace, first.trace)]
    assert b == Budget(max_nfe=200) and Budget.coerce(b) is b
