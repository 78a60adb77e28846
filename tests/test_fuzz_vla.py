"""Property-based fuzzing of robot-action search: RoboMonkeyPolicy.select_action and mmtts.search over ActionProcess.

Observation batches of random size (0, 1 and more), dtype (float32/64/16,
integers, bool, complex), container (tensors, numpy arrays, lists, nested
object arrays) and content (NaN, inf, huge values), sometimes with a missing,
misshapen or mismatched entry, go through a Gaussian-head policy or a
noise-taking policy (sometimes one returning NaN, the wrong shape, integers
or raising), scored by an MLP action scorer or a verifier function
(sometimes returning NaN, the wrong length, or raising), on action spaces
with discrete dimensions, with random wrapper and strategy settings, budgets
(0, tiny, huge, NaN) and seeds. Every property is: the call either succeeds
with actions of the right shape inside the action bounds (and the budget
kept), or raises an :class:`~mmtts.core.errors.MmttsError`; never a raw
torch, numpy or Python error and never a hang. The same seed gives the same
actions. Example counts follow the hypothesis profile registered in
conftest.py: ``ci`` by default, ``HYPOTHESIS_PROFILE=long`` for the long run.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import mmtts
import mmtts.strategies.robomonkey  # noqa: F401  (registration)
import mmtts.strategies.sample_verify  # noqa: F401  (registration)
from mmtts.core import Budget, FunctionVerifier, MmttsError
from mmtts.modalities.vla import (ActionProcess, ActionSpace, ActionVerifier, GaussianPolicy, MLPActionScorer,
                                  NoisePolicy, RoboMonkeyPolicy)

from test_fuzz_search import SEEDS, mostly, run_checked

EXAMPLES = settings.default.max_examples
STATE = "observation.state"
S = 4
NAN, INF = float("nan"), float("inf")


class Head(nn.Module):
    """A Gaussian head over 2 action dimensions (or ``dim``), in ``dtype``."""

    def __init__(self, dim: int = 2, dtype: torch.dtype = torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.dim = nn.Linear(S, 2 * dim).to(dtype), dim

    def forward(self, s):
        o = self.lin(s)
        return torch.tanh(o[:, : self.dim]), o[:, self.dim:] - 1.0


def _noise_fn(kind: str):
    def fn(batch, noise):
        m = noise.shape[0]
        if kind == "raises":
            raise ZeroDivisionError("the user's policy broke")
        if kind == "nan":
            return torch.full((m, 2), NAN)
        if kind == "some_nan":
            return torch.where(torch.arange(m)[:, None] % 2 == 0, torch.full((m, 2), NAN), noise[:, :2])
        if kind == "integer":
            return (noise[:, :2] > 0).to(torch.int64)
        if kind == "wrong_shape":
            return noise[:, :1]
        if kind == "huge":
            return 1e30 * noise[:, :2]
        if kind == "list":
            return noise.tolist()
        return 0.5 * noise[:, :2]
    return fn


NOISE_KINDS = ["plain"] * 6 + ["some_nan", "integer", "huge"]
BAD_NOISE_KINDS = ["raises", "nan", "wrong_shape", "list"]


@st.composite
def policies(draw):
    kind = draw(st.sampled_from(["gaussian"] * 3 + ["noise"] * 2))
    if kind == "gaussian":
        dim = draw(mostly(st.just(2), st.just(3), 8))
        return GaussianPolicy(Head(dim, draw(st.sampled_from([torch.float32] * 3 + [torch.float64]))), S,
                              temperature=draw(st.sampled_from([1.0, 0.0, 3.0])))
    noise = draw(mostly(st.sampled_from(NOISE_KINDS), st.sampled_from(BAD_NOISE_KINDS), 15))
    return NoisePolicy(_noise_fn(noise), (2,), input_shapes={STATE: (S,)})


def _scorer(dtype=torch.float32):
    torch.manual_seed(1)
    return MLPActionScorer(S, 2, hidden=8).to(dtype).eval()


def _fn_verifier(kind: str):
    def fn(actions, observations):
        m = actions.shape[0]
        if kind == "raises":
            raise KeyError("the user's verifier broke")
        if kind == "nan":
            return torch.full((m,), NAN)
        if kind == "short":
            return torch.zeros(max(m - 1, 0))
        if kind == "string":
            return "good"
        if kind == "some_inf":
            return torch.where(torch.arange(m) == 0, torch.tensor(INF), -actions.flatten(1).abs().sum(1))
        return -actions.flatten(1).abs().sum(1)
    return fn


@st.composite
def verifiers(draw, search: bool = False):
    """Verifiers as RoboMonkeyPolicy takes them (a Verifier or fn(actions, observations)), or as mmtts.search
    takes a verifier of actions (``search``: a function with context is a FunctionVerifier)."""
    bad = ["nan", "short", "string", "wrong_scorer"] + ([] if search else ["raises"])
    kind = draw(mostly(st.sampled_from(["scorer", "scorer", "folded", "f64", "fn", "some_inf"]),
                       st.sampled_from(bad), 15))
    if kind == "scorer":
        return ActionVerifier(_scorer())
    if kind == "folded":
        return ActionVerifier(_scorer().folded())
    if kind == "f64":
        return ActionVerifier(_scorer(torch.float64))
    if kind == "wrong_scorer":
        torch.manual_seed(1)
        return ActionVerifier(MLPActionScorer(S + 1, 2, hidden=8).eval())
    fn = _fn_verifier("plain" if kind == "fn" else kind)
    return FunctionVerifier(fn, takes_context=True) if search else fn


SPACES = mostly(st.sampled_from([ActionSpace.box(-1, 1, dim=2), ActionSpace.box(-1, 1, dim=2, discrete=[1]),
                                 ActionSpace.box([-0.5, 0.0], [0.5, 1.0], discrete=[0])]),
                st.sampled_from([ActionSpace.box(-1, 1, dim=3), "box", None]), 8)


@st.composite
def observations(draw):
    b = draw(st.sampled_from([0, 1, 1, 2, 3, 5]))
    x = torch.randn(b, S, generator=torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16))), dtype=torch.float64)
    content = draw(mostly(st.sampled_from(["plain"] * 6 + ["huge"]), st.sampled_from(["nan", "inf"]), 8))
    if content == "huge":
        x = x * 1e30
    elif content != "plain" and x.numel():
        x.view(-1)[0] = NAN if content == "nan" else INF
    dtype = draw(mostly(st.sampled_from(["float32"] * 4 + ["float64", "float16", "int64", "bool"]),
                        st.sampled_from(["complex64", "object"]), 8))
    container = draw(st.sampled_from(["torch", "torch", "numpy", "list"]))
    if dtype == "object":
        state = np.empty(b, dtype=object)
        state[:] = [list(r) for r in x.tolist()] if b else []
    elif container == "numpy":
        state = x.numpy().astype(dtype)
    elif container == "list":
        state = x.tolist()
    else:
        state = x.to(getattr(torch, dtype)) if dtype != "bool" else x > 0
    batch = {STATE: state}
    shape = draw(mostly(st.just("ok"), st.sampled_from(["one_row", "wide", "missing", "task_mismatch", "scalar",
                                                         "not_a_dict"]), 10))
    if shape == "one_row" and isinstance(state, torch.Tensor) and b:
        batch[STATE] = state[0]
    elif shape == "wide" and isinstance(state, torch.Tensor):
        batch[STATE] = torch.cat([state, state[:, :1]], 1)
    elif shape == "missing":
        batch = {"observation.other": state}
    elif shape == "task_mismatch":
        batch["task"] = ["reach"] * (b + 1)
    elif shape == "scalar":
        batch[STATE] = torch.tensor(1.0)
    elif shape == "not_a_dict":
        batch = state
    if draw(st.integers(0, 4)) == 0 and isinstance(batch, dict) and shape != "task_mismatch":
        batch["task"] = ["reach the target"] * b
    return batch


WHOLE = mostly(st.integers(1, 12), st.sampled_from([0, -1, 2.5, NAN, True, "4", None]), 8)
REAL_POS = mostly(st.one_of(st.none(), st.none(), st.floats(1e-6, 1.0)),
                  st.sampled_from([0.0, -1.0, NAN, INF, "1", True]), 8)


@st.composite
def wrapper_settings(draw):
    strategy = draw(mostly(st.sampled_from(["robomonkey", "robomonkey", "sample-verify"]), st.just("robo"), 5))
    kw = {"strategy": strategy, "n": draw(WHOLE)}
    if strategy == "robomonkey":
        kw["policy_samples"] = draw(st.one_of(st.none(), WHOLE))
    for key, values in (("deadline_s", REAL_POS), ("verifier_chunk", st.one_of(st.none(), WHOLE)),
                        ("dedupe_decimals", st.one_of(st.none(), st.integers(-2, 4), st.sampled_from([1.5, NAN]))),
                        ("seed", SEEDS), ("n_action_steps", st.one_of(st.none(), WHOLE)),
                        ("on_deadline", mostly(st.sampled_from(["fallback", "error"]), st.just("raise"), 5))):
        if draw(st.booleans()):
            kw[key] = draw(values)
    return kw


def check_actions(actions, batch, space: ActionSpace) -> None:
    b = len(batch[STATE])
    assert isinstance(actions, torch.Tensor) and actions.shape == (b, space.dim)
    assert bool(torch.isfinite(actions).all())
    lo, hi = space.bounds(actions)
    assert bool((actions >= lo).all() and (actions <= hi).all())


@given(policy=policies(), verifier=verifiers(), space=SPACES, batch=observations(), kw=wrapper_settings(),
       steps=st.integers(1, 3))
@settings(max_examples=EXAMPLES * 3, suppress_health_check=[HealthCheck.too_slow])
def test_select_action_acts_inside_the_bounds_or_raises_an_mmtts_error(policy, verifier, space, batch, kw, steps):
    agent = run_checked(lambda: RoboMonkeyPolicy(policy, verifier, space, **kw))
    if agent is None:
        return
    for _ in range(steps):
        a = run_checked(lambda: agent.select_action(batch))
        if a is None:
            return
        step = agent.diagnostics[-1]
        if step.samples == 1 or any(step.fallback):  # the policy's own first sample, untouched (not clipped)
            assert a.shape == (step.rows, space.dim) and bool(torch.isfinite(a).all())
        else:
            check_actions(a, batch, space)
    agent.reset()


ACTION_SETTINGS = {
    "sample-verify": {"n": WHOLE, "chunk": WHOLE, "decimals": mostly(st.integers(-1, 3), st.sampled_from([1.5, NAN, "2"]), 8),
                      "select": st.sampled_from(["argmax", "softmax", "sotfmax"]),
                      "temperature": mostly(st.floats(0.01, 10), st.sampled_from([0.0, NAN]), 10),
                      "deadline_s": REAL_POS},
    "robomonkey": {"n": WHOLE, "policy_samples": WHOLE, "chunk": WHOLE, "decimals": mostly(st.integers(-1, 3), st.sampled_from([1.5, NAN, "2"]), 8),
                   "published": st.booleans(), "deadline_s": REAL_POS},
}
BUDGETS = mostly(st.integers(1, 200),
                 st.sampled_from([0, -1, NAN, 10 ** 12, Budget(max_nfe=10 ** 12, max_seconds=0.1)]), 12)


@given(policy=policies(), verifier=verifiers(search=True), space=SPACES, batch=observations(), data=st.data(),
       name=st.sampled_from(sorted(ACTION_SETTINGS)), budget=BUDGETS, seed=SEEDS)
@settings(max_examples=EXAMPLES * 3, suppress_health_check=[HealthCheck.too_slow])
def test_action_search_succeeds_with_its_invariants_or_raises_an_mmtts_error(policy, verifier, space, batch, data,
                                                                            name, budget, seed):
    pool = ACTION_SETTINGS[name]
    kw = {k: data.draw(pool[k]) for k in data.draw(st.lists(st.sampled_from(sorted(pool)), max_size=3, unique=True))}
    process = run_checked(lambda: ActionProcess(policy, batch, space))
    if process is None:
        return
    r = run_checked(lambda: mmtts.search(process, verifier, name, budget=budget, seed=seed, **kw))
    if r is None:
        return
    b = process.rows
    assert r.outputs.ndim == 3 and r.outputs.shape[0] == b and r.outputs.shape[-1] == space.dim
    assert r.scores.dtype == torch.float64 and r.scores.shape == (b,)
    assert not bool((r.scores == INF).any())
    cap = Budget.coerce(budget).max_nfe
    assert cap is None or r.budget["nfe"] <= cap


@given(batch=observations(), n=st.integers(2, 8), samples=st.integers(2, 4), seed=st.integers(0, 2 ** 63 - 1),
       strategy=st.sampled_from(["robomonkey", "sample-verify"]))
@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
def test_same_seed_same_actions(batch, n, samples, seed, strategy):
    space = ActionSpace.box(-1, 1, dim=2, discrete=[1])

    def episode():
        kw = {"policy_samples": samples} if strategy == "robomonkey" else {}
        agent = RoboMonkeyPolicy(GaussianPolicy(Head(), S), ActionVerifier(_scorer()), space, n=n, seed=seed,
                                 strategy=strategy, **kw)
        return [agent.select_action(batch) for _ in range(2)]

    a, b = run_checked(episode), run_checked(episode)
    assert (a is None) == (b is None)
    if a is not None:
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        for x in a:
            check_actions(x, batch, space)


@given(observation=st.sampled_from([np.zeros((2, S)), np.zeros((2, S), dtype=np.float32), np.zeros((1, S)) + 0.5,
                                    torch.zeros(2, S, dtype=torch.float64), torch.zeros(2, S, dtype=torch.float16),
                                    torch.ones(2, S, dtype=torch.int64)]))
@settings(max_examples=12, derandomize=True)
def test_unambiguous_observations_are_converted(observation):
    agent = RoboMonkeyPolicy(GaussianPolicy(Head(), S), ActionVerifier(_scorer()), ActionSpace.box(-1, 1, dim=2),
                             n=4, policy_samples=2)
    a = run_checked(lambda: agent.select_action({STATE: observation}))
    assert a is not None, "an unambiguous conversion was refused"
    assert a.dtype == torch.float32 and a.shape == (len(observation), 2)


def test_empty_and_complex_batches_are_refused_by_name():
    agent = RoboMonkeyPolicy(GaussianPolicy(Head(), S), ActionVerifier(_scorer()), ActionSpace.box(-1, 1, dim=2))
    for batch, words in (({STATE: torch.zeros(0, S)}, "empty"), ({STATE: torch.zeros(2, S, dtype=torch.complex64)},
                                                                  "real numbers")):
        try:
            agent.select_action(batch)
        except MmttsError as e:
            assert words in str(e) and (words == "empty" or STATE in str(e))
        else:
            raise AssertionError(f"{batch} was accepted")
