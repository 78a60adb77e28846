"""Property-based fuzzing of the search side: random budgets, seeds, settings, stages, verifiers and processes.

Every property is: the call either succeeds with an output that passes its
invariants (counts, shapes, finite scores or -inf, the budget kept, the same
seed giving the same result), or raises an :class:`~mmtts.core.errors.MmttsError`;
never a raw torch, numpy or Python error, and never a hang (each example runs
under a hard wall-clock alarm). Example counts follow the hypothesis profile
registered in conftest.py: ``ci`` by default, ``HYPOTHESIS_PROFILE=long`` for
the long run.
"""

from __future__ import annotations

import inspect
import math
import signal
import time
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import mmtts
from mmtts.core import Budget, FunctionVerifier, MmttsError
from mmtts.core.verifier import check_scores
from mmtts.modalities.toy_gmm import DEFAULT_MIXTURE, DEFAULT_TARGET, GMMDiffusion, QuadraticReward
from mmtts.strategies.resampling import effective_sample_size, normalize_log_weights, resample

REWARD = QuadraticReward(DEFAULT_TARGET)
HANG_SECONDS = 20.0  # no example may run longer than this: far above any budget drawn here
SLACK_SECONDS = 5.0  # past max_seconds: the stage in flight, one candidate finished, scoring
EXAMPLES = settings.default.max_examples
NAN, INF = float("nan"), float("inf")


def mostly(valid, bad, percent_bad: int = 15):
    """Values from ``valid``, and from ``bad`` in about ``percent_bad`` % of draws (so most calls get far)."""
    return st.integers(0, 99).flatmap(lambda u: bad if u >= 100 - percent_bad else valid)


class Hang(Exception):
    """An example ran past HANG_SECONDS."""


@contextmanager
def alarm(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"no answer after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_checked(fn):
    """``fn()``'s value, or None when it raised an MmttsError; any other exception (a hang included) propagates."""
    with alarm(HANG_SECONDS), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-finite scores, collapses, deprecations: warnings are allowed
        try:
            out = fn()
        except MmttsError as e:
            event(f"refused: {type(e).__name__}")
            return None
    event("succeeded")
    return out


# -- processes -----------------------------------------------------------------------------------------------------
class Undeclared(GMMDiffusion):
    """The toy sampler with its stochasticity left undeclared."""

    def is_stochastic(self, stage):
        return None


class Miscounting(GMMDiffusion):
    """The toy sampler with one method returning the wrong number of candidates or outputs."""

    def __init__(self, wrong: str, num_stages: int):
        super().__init__(DEFAULT_MIXTURE, num_stages, sampler="ddim", eta=1.0)
        self.wrong = wrong

    def init(self, streams, first_index=0):
        state = super().init(streams, first_index)
        return state.select([0] * (len(state) + 1)) if self.wrong == "init" else state

    def step(self, state):
        new = super().step(state)
        return new.select(list(range(len(new) - 1))) if self.wrong == "step" else new

    def finish(self, state):
        x = super().finish(state)
        return {"finish": torch.cat([x, x[:1]]), "finish_empty": x[:0], "finish_flat": x.reshape(-1),
                "finish_list": [1.0] * (len(x) + 1), "finish_scalar": x.sum()}.get(self.wrong, x)

    def preview(self, state):
        x = super().preview(state)
        return torch.cat([x, x[:1]]) if self.wrong == "preview" else x


WRONG = ["init", "step", "finish", "finish_empty", "finish_flat", "finish_list", "finish_scalar", "preview"]


@st.composite
def processes(draw):
    T = draw(st.integers(1, 5))
    kind = draw(mostly(st.sampled_from(["exact", "ddim", "ddim", "undeclared"]), st.just("miscounting")))
    if kind == "exact":
        return GMMDiffusion(DEFAULT_MIXTURE, T, sampler="exact")
    if kind == "ddim":
        return GMMDiffusion(DEFAULT_MIXTURE, T, sampler="ddim", eta=draw(st.sampled_from([0.0, 0.3, 1.0])))
    if kind == "undeclared":
        return Undeclared(DEFAULT_MIXTURE, T, sampler="ddim", eta=0.0)
    return Miscounting(draw(st.sampled_from(WRONG)), T)


# -- verifiers -----------------------------------------------------------------------------------------------------
def _reward(x):
    return REWARD.score(x) if isinstance(x, torch.Tensor) and x.ndim == 2 else torch.zeros(len(x))


def _nan_some(x):
    r = _reward(x)
    return torch.where(torch.arange(len(r)) % 2 == 0, torch.full_like(r, NAN), r)


GOOD_VERIFIERS = ["reward", "reward", "reward", "list", "ints", "numpy", "column", "nan_some", "nan_all", "inf_some",
                  "neg_inf_all", "huge", "constant", "positive", "huge_positive"]
VERIFIERS = {
    "reward": _reward,
    "list": lambda x: _reward(x).tolist(),
    "ints": lambda x: (_reward(x) * 10).round().to(torch.int64),
    "numpy": lambda x: _reward(x).numpy().astype(np.float32),
    "column": lambda x: _reward(x)[:, None],
    "nan_some": _nan_some,
    "nan_all": lambda x: torch.full((len(x),), NAN),
    "inf_some": lambda x: torch.where(torch.arange(len(x)) == 0, torch.tensor(INF, dtype=torch.float64),
                                      _reward(x)),
    "neg_inf_all": lambda x: torch.full((len(x),), -INF),
    "huge": lambda x: _reward(x) * 1e300,
    "positive": lambda x: 100.0 + _reward(x),
    "huge_positive": lambda x: 1e300 * (100.0 + _reward(x)),
    "constant": lambda x: torch.zeros(len(x)),
    "wrong_length": lambda x: _reward(x)[:-1] if len(x) > 1 else torch.zeros(2),
    "wrong_shape": lambda x: torch.zeros(len(x), 2),
    "empty": lambda x: torch.empty(0),
    "scalar": lambda x: torch.tensor(1.0),
    "string": lambda x: "good",
    "none": lambda x: None,
    "dicts": lambda x: [{"score": 1.0}] * len(x),
    "complex": lambda x: torch.ones(len(x), dtype=torch.complex64),
}


@st.composite
def verifiers(draw):
    kind = draw(mostly(st.sampled_from(GOOD_VERIFIERS), st.sampled_from(sorted(VERIFIERS))))
    return FunctionVerifier(VERIFIERS[kind], name=kind, nonfinite=draw(mostly(st.just("last"), st.just("error"))))


# -- budgets and seeds ---------------------------------------------------------------------------------------------
COUNTS = mostly(st.one_of(st.integers(1, 240), st.integers(30, 240), st.just(10 ** 12)),
                st.sampled_from([0, -3, NAN, INF, -INF, 2.5, 40.0, True, False, "40", None]))
SECONDS = mostly(st.one_of(st.none(), st.none(), st.floats(0.02, 0.4)),
                 st.sampled_from([0.0, -1.0, NAN, INF, True, "1"]))
HUGE = 10 ** 9


@st.composite
def budgets(draw):
    if draw(st.booleans()):
        b = draw(st.one_of(st.integers(1, 240), COUNTS))
        return Budget(max_nfe=b, max_seconds=0.3) if _is_huge(b) else b
    nfe, calls, secs = draw(COUNTS), draw(st.one_of(st.none(), COUNTS)), draw(SECONDS)
    if (_is_huge(nfe) or _is_huge(calls) or (nfe is None and calls is None)) and secs is None:
        secs = 0.3  # spending a huge count cap would take hours: a deadline bounds every example
    try:
        return Budget(max_nfe=nfe, max_verifier_calls=calls, max_seconds=secs)
    except MmttsError:
        return (nfe, calls, secs)  # the bad spec itself: Budget refuses it again inside the call


def _is_huge(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > HUGE


def _as_budget(b):
    return Budget(*b) if isinstance(b, tuple) else b


SEEDS = mostly(st.one_of(st.integers(0, 2 ** 63 - 1), st.integers(0, 5)),
               st.sampled_from([-1, 2 ** 63, 2 ** 64, 1.5, True, "0", None, NAN]), percent_bad=8)

# -- strategy settings ---------------------------------------------------------------------------------------------
WHOLE = mostly(st.one_of(st.integers(1, 5), st.just(2.0)), st.sampled_from([0, -1, None, 2.5, NAN, INF, True, "2"]),
               percent_bad=8)
REAL = mostly(st.one_of(st.floats(0, 1), st.floats(0, 20), st.just(1e308)),
              st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([-1, None, True, "0.5"])),
              percent_bad=8)
FLAG = mostly(st.booleans(), st.sampled_from([1, "yes", None]), percent_bad=8)
SETTINGS = {
    "best-of-n": {"n": WHOLE, "batch_size": WHOLE, "keep": WHOLE},
    "beam": {"beams": WHOLE, "width": WHOLE, "interval": WHOLE, "keep": WHOLE,
             "fork": st.sampled_from(["noise", "perturb", "nosie"])},
    "particle-filter": {"n": WHOLE, "lmbda": REAL, "ess_threshold": REAL, "interval": WHOLE, "keep": WHOLE,
                        "potential": st.sampled_from(["diff", "max", "add", "rt", "sum"]),
                        "resampling": st.sampled_from(["systematic", "multinomial", "stratified"]),
                        "final_resample": FLAG, "fork": st.sampled_from(["noise", "perturb"])},
    "zero-order": {"neighbours": WHOLE, "radius": REAL, "restart": FLAG, "keep": WHOLE},
    "paths": {"n": WHOLE, "width": WHOLE, "start": REAL, "forward": WHOLE, "backward": WHOLE, "keep": WHOLE},
    "evosearch": {"n": WHOLE, "initial": WHOLE, "elites": WHOLE, "tournament": WHOLE, "archive_fraction": REAL,
                  "noise_beta": REAL, "latent_scale": REAL, "noise_generations": WHOLE, "keep": WHOLE,
                  "lineages": WHOLE, "published": FLAG,
                  "stages": st.one_of(st.none(), st.lists(st.integers(-1, 5), max_size=3), st.just("12"))},
}


@st.composite
def strategies(draw):
    name = draw(st.sampled_from(sorted(SETTINGS)))
    pool = SETTINGS[name]
    chosen = draw(st.lists(st.sampled_from(sorted(pool)), max_size=3, unique=True))
    kw = {k: draw(pool[k]) for k in chosen}
    if draw(st.integers(0, 29)) == 29:
        kw[draw(st.sampled_from(["lmda", "beam", "population_size", "N"]))] = 1  # a misspelt setting
    return name, kw


# -- invariants ----------------------------------------------------------------------------------------------------
def check_result(r, budget: Budget, keep: int, wall: float):
    assert isinstance(r.outputs, torch.Tensor) and r.outputs.ndim == 2 and r.outputs.shape[1] == 2
    k = len(r.outputs)
    assert 1 <= k <= keep
    assert r.scores.dtype == torch.float64 and r.scores.shape == (k,)
    assert not torch.isnan(r.scores).any() and not (r.scores == INF).any()  # finite, or -inf: ranked last
    assert bool((r.scores[:-1] >= r.scores[1:]).all())  # best first
    b = r.budget
    assert b["nfe"] <= (budget.max_nfe or INF) and b["verifier_calls"] <= (budget.max_verifier_calls or INF)
    assert r.stopped is None or (r.stopped == "deadline" and budget.max_seconds is not None)
    if budget.max_seconds is not None:
        assert wall <= budget.max_seconds + SLACK_SECONDS
    assert b["stopped"] == r.stopped


@given(process=processes(), verifier=verifiers(), strategy=strategies(), budget=budgets(), seed=SEEDS)
@settings(max_examples=EXAMPLES * 3, suppress_health_check=[HealthCheck.too_slow])
def test_search_succeeds_with_its_invariants_or_raises_an_mmtts_error(process, verifier, strategy, budget, seed):
    name, kw = strategy
    t0 = time.perf_counter()
    r = run_checked(lambda: mmtts.search(process, verifier, name, budget=_as_budget(budget), seed=seed, **kw))
    wall = time.perf_counter() - t0
    if r is None:
        return
    keep = mmtts.create_strategy(name, **kw).keep
    check_result(r, Budget.coerce(_as_budget(budget)), keep, wall)
    if isinstance(process, Miscounting) and process.wrong != "preview":
        pytest.fail(f"{process.wrong} returned the wrong count and the search went on")


@given(process=processes(), strategy=strategies(), nfe=st.integers(1, 160), seed=st.integers(0, 2 ** 63 - 1))
@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
def test_same_seed_same_result(process, strategy, nfe, seed):
    name, kw = strategy

    def once():
        return mmtts.search(process, REWARD, name, budget=nfe, seed=seed, **kw)

    a = run_checked(once)
    b = run_checked(once)
    assert (a is None) == (b is None)
    if a is not None:
        assert torch.equal(a.outputs, b.outputs) and torch.equal(a.scores, b.scores)
        assert {k: v for k, v in a.budget.items() if k != "seconds"} == \
            {k: v for k, v in b.budget.items() if k != "seconds"}
        assert a.extra == b.extra


@given(process=processes(), kind=st.sampled_from(GOOD_VERIFIERS), n=st.integers(1, 12),
       lmbda=st.one_of(st.floats(0, 1e308), st.sampled_from([0.0, 1e-300, 1.0, 1e308])),
       potential=st.sampled_from(["diff", "max", "add", "rt"]), ess_threshold=st.floats(0, 1),
       resampling=st.sampled_from(["systematic", "multinomial"]), fork=st.sampled_from(["noise", "perturb"]),
       seed=st.integers(0, 2 ** 63 - 1))
@settings(max_examples=EXAMPLES * 2, suppress_health_check=[HealthCheck.too_slow])
def test_particle_filter_weights_never_break(process, kind, n, lmbda, potential, ess_threshold, resampling, fork,
                                             seed):
    kw = dict(n=n, lmbda=lmbda, potential=potential, ess_threshold=ess_threshold, resampling=resampling, fork=fork)
    r = run_checked(lambda: mmtts.search(process, FunctionVerifier(VERIFIERS[kind], name=kind), "particle-filter",
                                         budget=n * process.num_stages, seed=seed, **kw))
    if r is not None:
        check_result(r, Budget(max_nfe=n * process.num_stages), 1, 0.0)
        assert len(r.population) == n and r.extra["distinct"] <= n


@given(nfe=COUNTS, calls=COUNTS, secs=SECONDS)
@settings(max_examples=EXAMPLES * 3)
def test_a_budget_is_valid_or_refused(nfe, calls, secs):
    b = run_checked(lambda: Budget(max_nfe=nfe, max_verifier_calls=calls, max_seconds=secs))
    if b is not None:
        for cap in (b.max_nfe, b.max_verifier_calls):
            assert cap is None or (type(cap) is int and cap >= 1)
        assert b.max_seconds is None or (type(b.max_seconds) is float and 0 < b.max_seconds < INF)
        assert b.caps() != (None, None, None)


@given(kind=st.sampled_from(sorted(VERIFIERS)), n=st.integers(0, 6), nonfinite=st.sampled_from(["last", "error"]))
@settings(max_examples=EXAMPLES * 3)
def test_verifier_scores_are_one_number_per_candidate_or_refused(kind, n, nonfinite):
    x = torch.randn(n, 2, dtype=torch.float64)
    s = run_checked(lambda: FunctionVerifier(VERIFIERS[kind], nonfinite=nonfinite)(x))
    if s is not None:
        assert s.dtype == torch.float64 and s.shape == (n,)
        assert not torch.isnan(s).any() and not (s == INF).any()
    s = run_checked(lambda: check_scores(VERIFIERS[kind](x), n, kind, nonfinite))
    if s is not None:
        assert s.shape == (n,) and not torch.isnan(s).any() and not (s == INF).any()


LOG_WEIGHTS = st.lists(st.one_of(st.floats(-1e300, 1e300), st.just(-INF)), min_size=1, max_size=12)


@given(log_w=LOG_WEIGHTS, n=st.integers(1, 16), scheme=st.sampled_from(["systematic", "multinomial"]),
       seed=st.integers(0, 2 ** 32 - 1))
@settings(max_examples=EXAMPLES * 3)
def test_resampling_draws_only_candidates_with_weight(log_w, n, scheme, seed):
    lw = torch.tensor(log_w, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = normalize_log_weights(lw)
        idx = resample(lw, n, scheme, np.random.default_rng(seed))
        ess = effective_sample_size(lw)
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-9) and bool((w >= 0).all())
    assert idx.shape == (n,) and bool((idx[1:] >= idx[:-1]).all()) and bool((w[idx] > 0).all())
    assert 1.0 - 1e-9 <= ess <= len(log_w) + 1e-9


@given(name=st.sampled_from(sorted(SETTINGS)), keyword=st.text(min_size=1, max_size=12))
@settings(max_examples=EXAMPLES)
def test_unknown_settings_are_refused_listing_the_valid_ones(name, keyword):
    valid = set(inspect.signature(type(mmtts.create_strategy(name)).__init__).parameters)
    if keyword in valid:
        return
    with pytest.raises(MmttsError, match="its settings are"):
        mmtts.create_strategy(name, **{keyword: 1})
