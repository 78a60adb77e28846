"""The action process and the sample-verify / robomonkey strategies on the core: streams, batching, budgets."""

import warnings

import pytest
import torch
from torch import nn

import mmtts
import mmtts.strategies.robomonkey  # noqa: F401  (registration)
import mmtts.strategies.sample_verify  # noqa: F401  (registration)
from mmtts.core.budget import Budget
from mmtts.core.errors import BudgetError, MmttsError
from mmtts.core.process import Process
from mmtts.core.rng import Streams, derive_seed
from mmtts.modalities.vla import (ActionProcess, ActionSpace, ActionVerifier, GaussianPolicy, MLPActionScorer,
                                  NoisePolicy, RoboMonkeyPolicy)
from mmtts.strategies.robomonkey import RoboMonkey
from mmtts.strategies.sample_verify import SampleVerify

STATE = "observation.state"
SPACE = ActionSpace.box(-1, 1, dim=2)


class RowHead(nn.Module):
    """A Gaussian head computed row by row (elementwise), so a row's output cannot depend on the rows beside it."""

    def forward(self, s):
        return torch.tanh(s[:, :2]), 0.2 * s[:, 2:4] - 1.0


def observations(b=3, seed=0):
    return {STATE: torch.randn(b, 4, generator=torch.Generator().manual_seed(seed))}


def scorer(seed=0):
    torch.manual_seed(seed)
    return MLPActionScorer(4, 2, hidden=16).eval()


def test_candidates_do_not_depend_on_chunks_or_order():
    p = ActionProcess(GaussianPolicy(RowHead(), 4), observations(), SPACE)
    assert isinstance(p, Process) and p.rows == 3 and p.nfe_per_candidate() == 1
    whole = p.init(Streams.spawn(7, 12))
    assert whole.data["row"].tolist() == [0, 1, 2] * 4  # candidate i answers observation i % 3: rounds of 3
    # started in two chunks (the second continuing the run's indices): the same rows and noise
    parts = [p.init(Streams.spawn(7, 5), first_index=0), p.init(Streams.spawn(7, 7, start=5), first_index=5)]
    for key in ("row", "noise"):
        assert torch.equal(torch.cat([s.data[key] for s in parts]), whole.data[key])
    done = p.step(whole)
    # stepped in chunks of any size, or in another order: every candidate gets the same action
    for size in (1, 5, 12):
        chunks = [p.step(whole.select(torch.arange(i, min(i + size, 12)))) for i in range(0, 12, size)]
        assert torch.equal(torch.cat([p.finish(c) for c in chunks]), p.finish(done))
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    assert torch.equal(p.finish(p.step(whole.select(perm))), p.finish(done)[perm])
    assert p.finish(done).shape == (12, 1, 2) and bool(p.valid(done).all())
    # the noise is the streams' own: a candidate's sample is its head's Gaussian at its noise
    mean, log_std = RowHead()(observations()[STATE])
    expected = mean[whole.data["row"]] + log_std[whole.data["row"]].exp() * whole.data["noise"]
    assert torch.equal(p.finish(done)[:, 0], expected)


def test_mlp_policy_rows_agree_across_chunks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 32), nn.SiLU(), nn.Linear(32, 4))

    class Head(nn.Module):
        def forward(self, s):
            out = net(s)
            return out[:, :2], out[:, 2:]
    p = ActionProcess(GaussianPolicy(Head(), 4), observations(), SPACE)
    state = p.init(Streams.spawn(3, 9))
    whole = p.finish(p.step(state))
    alone = torch.cat([p.finish(p.step(state.select([i]))) for i in range(9)])
    assert torch.allclose(whole, alone, atol=1e-6)


def test_invalid_samples_are_marked_and_zeroed_and_bad_shapes_named():
    def flow(batch, noise):
        out = noise.clone()
        out[1] = float("nan")
        return out
    p = ActionProcess(NoisePolicy(flow, (2,), {STATE: (4,)}), observations(2), SPACE)
    done = p.step(p.init(Streams.spawn(0, 4)))
    assert p.valid(done).tolist() == [True, False, True, True]
    assert torch.equal(p.finish(done)[1], torch.zeros(1, 2))
    wide = ActionProcess(NoisePolicy(lambda batch, noise: noise, (3,)), observations(2), SPACE)
    with pytest.raises(MmttsError, match="action dimensions"):
        wide.step(wide.init(Streams.spawn(0, 2)))
    with pytest.raises(MmttsError, match="cannot sample"):
        ActionProcess(object(), observations(), SPACE)
    with pytest.raises(MmttsError, match=r"expects \(B, 4\)"):
        ActionProcess(GaussianPolicy(RowHead(), 4), {STATE: torch.zeros(2, 5)}, SPACE)


class Counter:
    """Counts the rows a module's forward sees, through a forward hook."""

    def __init__(self, module):
        self.rows, self.calls = 0, 0
        module.register_forward_hook(self.hook)

    def hook(self, module, args, out):
        self.calls += 1
        self.rows += int(out[0].shape[0] if isinstance(out, tuple) else out.shape[0])


@pytest.mark.parametrize("strategy, settings, n_policy", [("robomonkey", {"n": 16, "policy_samples": 8}, 8),
                                                          ("sample-verify", {"n": 6}, 6)])
def test_strategies_through_search_count_policy_forwards_and_verifier_calls(strategy, settings, n_policy):
    head, score = RowHead(), scorer()
    policy_rows, verifier_rows = Counter(head), Counter(score)
    p = ActionProcess(GaussianPolicy(head, 4), observations(3), SPACE)
    res = mmtts.search(p, ActionVerifier(score), strategy, budget=Budget(max_nfe=3 * n_policy), seed=5, **settings)
    assert res.outputs.shape == (3, 1, 2) and (res.outputs.abs() <= 1).all()
    # the budget counts exactly what the hooks saw: one policy row per sample, one verifier row per candidate
    assert res.budget["nfe"] == policy_rows.rows == 3 * n_policy and policy_rows.calls == 1
    assert res.budget["verifier_calls"] == verifier_rows.rows and verifier_rows.calls == 1
    keep = res.extra["keep"]
    distinct = 3 * settings["n"] if keep is None else int(keep.sum())
    assert res.budget["verifier_calls"] == distinct
    # each chosen action is the best scored candidate of its own observation
    full = res.extra["scores"]
    assert torch.equal(res.scores, full.max(1).values)
    again = mmtts.search(p, ActionVerifier(score), strategy, budget=3 * n_policy, seed=5, **settings)
    assert torch.equal(again.outputs, res.outputs) and torch.equal(again.scores, res.scores)
    other = mmtts.search(p, ActionVerifier(score), strategy, budget=3 * n_policy, seed=6, **settings)
    assert not torch.equal(other.outputs, res.outputs)
    # held-out verifiers judge the chosen actions against their own observations
    held = mmtts.search(p, ActionVerifier(score), strategy, budget=3 * n_policy, seed=5,
                        heldout={"same": ActionVerifier(scorer())}, **settings)
    assert torch.allclose(held.heldout["same"], res.scores)


def test_robomonkey_policy_is_the_search_at_the_step_seed():
    head, score = RowHead(), scorer()
    obs = observations(2, seed=3)
    w = RoboMonkeyPolicy(GaussianPolicy(head, 4), ActionVerifier(score), SPACE, n=12, policy_samples=4, seed=9)
    first, second = w.choose(obs), w.choose(obs)
    for step, chosen in enumerate((first, second)):
        res = mmtts.search(ActionProcess(GaussianPolicy(head, 4), obs, SPACE), ActionVerifier(score), "robomonkey",
                           budget=8, seed=derive_seed(9, 0, step), n=12, policy_samples=4)
        assert torch.equal(res.outputs, chosen)
    assert not torch.equal(first, second)
    assert w.diagnostics[-1].candidates == [12, 12] and w.diagnostics[-1].seconds["total"] > 0


def test_gaussian_noise_comes_from_the_first_sample_streams():
    """Candidates are mean + std * eps with eps drawn from each observation's first sample stream."""
    p = ActionProcess(GaussianPolicy(RowHead(), 4), observations(2), ActionSpace.box(-10, 10, dim=2))
    res = mmtts.search(p, ActionVerifier(scorer()), "robomonkey", budget=8, seed=4, n=5, policy_samples=4)
    streams = Streams.spawn(4, 8)
    state = p.step(p.init(streams))
    samples = p.finish(state).view(4, 2, 1, 2).transpose(0, 1)
    eps = streams.select(torch.arange(2), fork_duplicates=False).randn((5, 1, 2))
    std, mean = torch.std_mean(samples, 1)
    draws = mean[:, None] + std[:, None] * eps
    index = res.extra["index"]
    assert torch.allclose(res.outputs, draws[torch.arange(2), index], atol=1e-6)


def test_settings_names_and_errors():
    with pytest.warns(DeprecationWarning, match="use n="):
        assert RoboMonkey(num_candidates=8).n == 8
    with pytest.warns(DeprecationWarning, match="use policy_samples="):
        assert RoboMonkey(num_samples=4).policy_samples == 4
    with pytest.warns(DeprecationWarning, match="use n="):
        assert SampleVerify(num_samples=5).n == 5
    with pytest.warns(DeprecationWarning):
        w = RoboMonkeyPolicy(GaussianPolicy(RowHead(), 4), ActionVerifier(scorer()), SPACE, num_samples=3,
                             num_candidates=7)
    assert w.strategy.n == 7 and w.strategy.policy_samples == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RoboMonkey(n=8, policy_samples=4)
    with pytest.raises(MmttsError, match="once"):
        RoboMonkey(n=8, k=8)
    with pytest.raises(MmttsError, match="n=0"):
        SampleVerify(n=0)
    with pytest.raises(MmttsError, match="ActionProcess"):
        mmtts.search(_Toy(), lambda x: x.sum(1), "robomonkey", budget=16)
    p = ActionProcess(GaussianPolicy(RowHead(), 4), observations(3), SPACE)
    with pytest.raises(BudgetError, match="at least 24"):
        mmtts.search(p, ActionVerifier(scorer()), "robomonkey", budget=10, n=16, policy_samples=8)


class _Toy(Process):
    def init(self, streams, first_index=0):
        from mmtts.core.state import State
        return State.fresh({"x": streams.randn((2,))}, streams, first_index)

    def step(self, state):
        new = state.replace()
        new.stage = state.stage + 1
        return new

    def finish(self, state):
        return state.data["x"]


def test_observations_are_converted_or_refused_at_the_door():
    import numpy as np
    import torch as _torch

    from mmtts.core.errors import MmttsError
    from mmtts.modalities.vla import ActionProcess, ActionSpace, GaussianPolicy

    class Head(_torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = _torch.nn.Linear(3, 4)

        def forward(self, x):
            mean, log_std = self.lin(x).chunk(2, -1)
            return mean, log_std

    policy = GaussianPolicy(Head(), 3)
    space = ActionSpace(low=_torch.full((2,), -1.0), high=_torch.full((2,), 1.0))
    obs = np.random.default_rng(0).normal(size=(2, 3))  # a float64 numpy observation, as gymnasium returns
    as_numpy = ActionProcess(policy, {"observation.state": obs}, space)
    as_float32 = ActionProcess(policy, {"observation.state": _torch.as_tensor(obs, dtype=_torch.float32)}, space)
    assert as_numpy.observations["observation.state"].dtype == _torch.float32
    assert _torch.equal(as_numpy.observations["observation.state"], as_float32.observations["observation.state"])
    with pytest.raises(MmttsError, match=r"empty \(0 observations\)"):
        ActionProcess(policy, {"observation.state": _torch.zeros(0, 3)}, space)


class LinearHead(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)

    def forward(self, s):
        out = self.lin(s)
        return torch.tanh(out[:, :2]), out[:, 2:] - 1.0


def test_with_observations_is_the_process_built_for_them():
    policy, verifier = GaussianPolicy(LinearHead(), 4), ActionVerifier(scorer())
    first = ActionProcess(policy, observations(3, seed=0), SPACE)
    later = first.with_observations({STATE: observations(2, seed=1)[STATE].double().numpy()})  # converted too
    fresh = ActionProcess(policy, observations(2, seed=1), SPACE)
    assert later.rows == 2 and first.rows == 3 and later.observations[STATE].dtype == torch.float32
    a = mmtts.search(later, verifier, "robomonkey", budget=16, seed=5)
    b = mmtts.search(fresh, verifier, "robomonkey", budget=16, seed=5)
    assert torch.equal(a.outputs, b.outputs) and torch.equal(a.scores, b.scores)
    with pytest.raises(MmttsError, match="empty"):
        first.with_observations({STATE: torch.zeros(0, 4)})
