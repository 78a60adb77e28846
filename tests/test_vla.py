"""RoboMonkey pieces: augmenter, selector, action process, verifier training and the policy wrapper."""

import math
import time

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from mmtts.core.errors import MmttsError
from mmtts.core.rng import Streams, derive_seed
from mmtts.core.verifier import Cached, FunctionVerifier, MeanRank
from mmtts.modalities.vla import (ActionSpace, ActionVerifier, DeadlineMissed, GaussianAugmenter, GaussianPolicy,
                                  MLPActionScorer, NoisePolicy, NoValidActionError, QuadraticFeatures, RoboMonkeyPolicy,
                                  Selector, bradley_terry_margin_loss, synthetic_pairs,
                                  train_action_verifier)
from mmtts.modalities.vla.augment import distinct_rows, first_unique, first_unique_mask
from mmtts.modalities.vla.policy import all_finite

STATE = "observation.state"


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


class FixedPolicy:
    """Returns preset samples (B, N, D) whatever the noise; counts its calls.

    The action process asks for all B x N candidates of a step in one call, round by round (candidate
    r * B + b is sample r of observation b), so the row at position p gets ``samples[p % B, p // B]``.
    """

    def __init__(self, samples, state_dim=3):
        self.samples, self.calls = samples, 0
        self.input_shapes = {STATE: (state_dim,)}

    def draw_noise(self, streams, space):
        return streams.randn((space.dim,))

    def actions_from_noise(self, batch, noise):
        self.calls += 1
        b = self.samples.shape[0]
        p = torch.arange(noise.shape[0])
        return self.samples[p % b, p // b].clone()


class CountingVerifier(FunctionVerifier):
    """Scores by closeness to a fixed action; counts candidates and can be slow."""

    def __init__(self, best, delay=0.0):
        self.best, self.delay, self.seen = torch.as_tensor(best, dtype=torch.float32), delay, 0

        def fn(actions, obs):
            self.seen += actions.shape[0]
            time.sleep(self.delay)
            first = actions.reshape(actions.shape[0], -1, self.best.numel())[:, 0]  # the first action of a chunk
            return -((first - self.best) ** 2).sum(1)
        super().__init__(fn, name="closeness", takes_context=True)


def obs(b=1, s=3):
    return {STATE: torch.zeros(b, s)}


# -- augmenter ----------------------------------------------------------------------

def test_candidates_follow_the_fitted_gaussian():
    g = gen(1)
    samples = torch.randn(1, 6, 1, 3, generator=g, dtype=torch.float64) * torch.tensor([0.1, 1.0, 3.0]) + 2.0
    space = ActionSpace.box(-1e6, 1e6, dim=3)
    aug = GaussianAugmenter(space)
    cands = aug(samples, torch.randn(1, 20000, 1, 3, generator=gen(2), dtype=torch.float64))
    mean, var = cands.mean[0, 0], cands.var[0, 0]
    assert torch.allclose(mean, samples[0, :, 0].mean(0))
    assert torch.allclose(var, samples[0, :, 0].var(0, unbiased=True))
    x = cands.actions[0][:, 0]
    assert x.shape == (20000, 3)
    k = x.shape[0]
    assert ((x.mean(0) - mean).abs() < 4 * (var / k).sqrt()).all()
    # the sample variance of k normal draws has relative standard error sqrt(2 / (k - 1)) ~ 1%
    assert ((x.var(0) / var - 1).abs() < 4 * math.sqrt(2 / (k - 1))).all()
    for d in range(3):
        assert stats.kstest(x[:, d].numpy(), "norm", args=(float(mean[d]), float(var[d].sqrt()))).pvalue > 1e-3


def test_gripper_by_majority_and_clipping_to_bounds():
    space = ActionSpace.box([-1, -1, 0], [1, 1, 1], discrete=[2])
    # obs 0: gripper votes 0.9, 0.8, 0.1 -> closed (1); obs 1: 0.2, 0.3, 0.9 -> open (0); obs 2: 0.9, 0.1, NaN'd out
    grip = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.3, 0.9], [0.9, 0.1, 0.3]])
    cont = torch.tensor([[3.0, 0.0], [2.5, -0.2], [3.5, 0.2]])  # first dim far above its bound
    samples = torch.cat([cont[None].expand(3, 3, 2), grip[..., None]], -1)[:, :, None]
    valid = torch.tensor([[True, True, True], [True, True, True], [True, True, False]])
    cands = GaussianAugmenter(space)(samples, torch.randn(3, 64, 1, 3, generator=gen()), valid)
    assert [float(a[:, 0, 2].unique()) for a in cands.actions] == [1.0, 0.0, 1.0]  # a 1-1 tie goes to 1
    for a in cands.actions:
        assert (a[..., :2] <= 1).all() and (a[..., :2] >= -1).all()
        assert (a[:, 0, 0] == 1.0).float().mean() > 0.9  # the mean (3) is far above the bound: clipped


def test_vote_rule_is_mean_at_least_half_for_a_binary_gripper():
    space = ActionSpace.box([0], [1], discrete=[0])
    for votes in ([1, 1, 0], [1, 0], [0, 0, 1], [1, 0, 0, 0]):
        s = torch.tensor(votes, dtype=torch.float32)[None, :, None, None]
        expected = 1.0 if np.mean(votes) >= 0.5 else 0.0
        assert float(space.vote(s)) == expected


def test_dedupe_keeps_first_occurrences_in_order():
    rows = torch.tensor([[1.0, 2], [3, 4], [1, 2], [5, 6], [3, 4]])
    assert first_unique(rows).tolist() == [0, 1, 3]
    big = torch.randint(0, 5, (600, 2)).float()  # large enough for the sorting path
    keep = first_unique(big)
    assert len({tuple(r) for r in big.tolist()}) == keep.numel()
    small = [i for i in range(600) if tuple(big[i].tolist()) not in {tuple(big[j].tolist()) for j in range(i)}]
    assert keep.tolist() == small
    assert first_unique(torch.tensor([[0.101], [0.1049]]), decimals=2).tolist() == [0]


def test_clipped_duplicates_collapse_and_exit_early():
    space = ActionSpace.box(-1, 1, dim=2)
    # every sample far outside the box with tiny spread: every candidate clips to the same corner
    samples = torch.tensor([[[5.0, -5.0], [5.01, -5.02], [4.99, -4.98]]])[:, :, None]
    cands = GaussianAugmenter(space)(samples, torch.randn(1, 32, 1, 2, generator=gen()))
    assert cands.counts == [1] and cands.early_exit == [True]
    assert cands.actions[0].tolist() == [[[1.0, -1.0]]]


def test_early_exit_skips_the_verifier():
    same = torch.full((2, 5, 2), 0.3)
    verifier = CountingVerifier([0.0, 0.0])
    w = RoboMonkeyPolicy(FixedPolicy(same), verifier, ActionSpace.box(-1, 1, dim=2), n=16, policy_samples=5)
    a = w.select_action(obs(2))
    assert torch.allclose(a, torch.full((2, 2), 0.3))
    assert verifier.seen == 0 and w.diagnostics[-1].early_exit == [True, True]


def test_sample_set_verifies_the_policy_samples_themselves():
    samples = torch.tensor([[[0.5, 0.5], [0.1, 0.0], [0.5, 0.5], [2.0, 0.0]]])
    w = RoboMonkeyPolicy(FixedPolicy(samples), CountingVerifier([1.0, 0.0]), ActionSpace.box(-1, 1, dim=2),
                         n=4, strategy="sample-verify")
    assert w.select_action(obs()).tolist() == [[1.0, 0.0]]  # 2.0 clipped to the bound, then chosen
    assert w.diagnostics[-1].candidates == [3]  # the duplicate (0.5, 0.5) is scored once


# -- the wrapper ----------------------------------------------------------------------

def test_single_sample_returns_the_base_policy_action_exactly():
    raw = torch.tensor([[[3.7, -0.25, 0.7]]])  # out of bounds and a non-binary gripper value: left untouched
    space = ActionSpace.box([-1, -1, 0], [1, 1, 1], discrete=[2])
    verifier = CountingVerifier([0.0, 0.0, 0.0])
    for k in (1, 16):
        w = RoboMonkeyPolicy(FixedPolicy(raw), verifier, space, n=k, policy_samples=1)
        assert torch.equal(w.select_action(obs()), raw[:, 0])
    assert verifier.seen == 0

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4))

    class Head(nn.Module):
        def forward(self, s):
            out = net(s) * 10
            return out[:, :2], out[:, 2:]
    base = GaussianPolicy(Head(), 3, temperature=0.0)
    w = RoboMonkeyPolicy(base, verifier, ActionSpace.box(-1, 1, dim=2), n=1, policy_samples=1)
    b = {STATE: torch.randn(4, 3)}
    assert torch.equal(w.select_action(b), base.select_action(b))


def test_gaussian_policy_samples_are_seeded_and_scaled_by_temperature():
    class Head(nn.Module):
        def forward(self, s):
            return torch.zeros(s.shape[0], 2), torch.full((s.shape[0], 2), math.log(0.5))
    p = GaussianPolicy(Head(), 3, temperature=2.0)
    a = p.sample_actions(obs(2), 4000, gen(3))
    assert a.shape == (2, 4000, 2) and torch.equal(a, p.sample_actions(obs(2), 4000, gen(3)))
    assert abs(float(a.std()) - 1.0) < 0.03


def test_verifier_picks_the_best_candidate_and_same_seed_same_actions():
    samples = torch.randn(3, 8, 2, generator=gen(4)) * 0.5
    space = ActionSpace.box(-1, 1, dim=2)
    runs = []
    for _ in range(2):
        v = CountingVerifier([0.2, -0.1])
        w = RoboMonkeyPolicy(FixedPolicy(samples), v, space, n=16, policy_samples=8, seed=7)
        runs.append(torch.stack([w.select_action(obs(3)) for _ in range(3)]))
        d = w.diagnostics[-1]
        assert v.seen == 3 * sum(d.candidates) and d.candidates == [16, 16, 16]
        for b in range(3):
            assert d.chosen[b] == int(torch.argmax(d.scores[b]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0][0], runs[0][1])  # a new step draws new candidates
    w.reset()
    assert w.episode == 1 and w.step == 0 and w.diagnostics == []


def test_chunk_policies_are_queued_and_reset_clears_the_queue():
    calls = []

    def flow(batch, noise):
        calls.append(noise.shape)
        return torch.tanh(noise) * 0.5 + torch.arange(3.0)[None, :, None] * 0.1

    policy = NoisePolicy(flow, noise_shape=(3, 2), input_shapes={STATE: (3,)})
    w = RoboMonkeyPolicy(policy, CountingVerifier([0.0, 0.0]), ActionSpace.box(-1, 1, dim=2), n=8,
                         policy_samples=4)
    first = w.select_action(obs(2))
    assert first.shape == (2, 2) and calls == [(8, 3, 2)]  # B*N noise rows in one call
    w.select_action(obs(2))
    w.select_action(obs(2))
    assert len(calls) == 1  # the rest of the chunk came from the queue
    w.select_action(obs(2))
    assert len(calls) == 2
    w.reset()
    w.select_action(obs(2))
    assert len(calls) == 3


def test_softmax_selector_is_seeded_and_sharpens_to_argmax():
    scores = torch.tensor([0.0, 1.0, 3.0, 2.0], dtype=torch.float64)
    assert Selector()(scores, gen()) == 2
    cold = Selector("softmax", temperature=1e-3)
    assert all(cold(scores, gen(i)) == 2 for i in range(20))
    warm = Selector("softmax", temperature=1.0)
    picks = [warm(scores, gen(i)) for i in range(400)]
    assert picks == [warm(scores, gen(i)) for i in range(400)]
    p = torch.softmax(scores, 0).numpy()
    assert abs(picks.count(2) / 400 - p[2]) < 0.08
    with pytest.raises(MmttsError, match="mode"):
        Selector("best")


# -- bad input ------------------------------------------------------------------------

def test_wrong_observation_shapes_name_the_expected_shape():
    w = RoboMonkeyPolicy(FixedPolicy(torch.zeros(1, 4, 2)), CountingVerifier([0, 0]), ActionSpace.box(-1, 1, dim=2),
                         policy_samples=4)
    with pytest.raises(MmttsError, match=r"expects \(B, 3\)"):
        w.select_action({STATE: torch.zeros(1, 7)})
    with pytest.raises(MmttsError, match="unsqueeze"):
        w.select_action({STATE: torch.zeros(3)})
    with pytest.raises(MmttsError, match="has no 'observation.state'"):
        w.select_action({"observation.image": torch.zeros(1, 3)})
    with pytest.raises(MmttsError, match="dict"):
        w.select_action(torch.zeros(1, 3))
    with pytest.raises(MmttsError, match="NaN"):
        w.select_action({STATE: torch.tensor([[0.0, float("nan"), 0.0]])})
    with pytest.raises(MmttsError, match="disagree"):
        w.select_action({STATE: torch.zeros(2, 3), "task": ["reach"]})


def test_nan_samples_are_dropped_and_counted():
    samples = torch.tensor([[[float("nan"), 0.0], [0.2, 0.1], [0.3, float("inf")], [0.25, 0.12]]])
    w = RoboMonkeyPolicy(FixedPolicy(samples), CountingVerifier([0.2, 0.1]), ActionSpace.box(-1, 1, dim=2),
                         n=16, policy_samples=4)
    a = w.select_action(obs())
    assert torch.isfinite(a).all()
    d = w.diagnostics[-1]
    assert d.dropped == [2]
    # the Gaussian is fitted to the two valid samples only
    assert abs(float(a[0, 0]) - 0.225) < 0.1 and abs(float(a[0, 1]) - 0.11) < 0.05


def test_all_nan_samples_are_an_error():
    samples = torch.full((2, 3, 2), 0.1)
    samples[1] = float("nan")
    w = RoboMonkeyPolicy(FixedPolicy(samples), CountingVerifier([0, 0]), ActionSpace.box(-1, 1, dim=2),
                         policy_samples=3)
    with pytest.raises(NoValidActionError, match=r"observation\(s\) \[1\]"):
        w.select_action(obs(2))


def test_wrong_action_shape_and_settings_are_errors():
    space = ActionSpace.box(-1, 1, dim=2)
    w = RoboMonkeyPolicy(FixedPolicy(torch.zeros(1, 4, 3)), CountingVerifier([0, 0]), space, policy_samples=4)
    with pytest.raises(MmttsError, match="action dimensions"):
        w.select_action(obs())
    for kwargs, msg in [({"n": 0}, "n=0"), ({"policy_samples": 0}, "policy_samples"),
                        ({"deadline_s": 0}, "deadline_s"), ({"on_deadline": "skip"}, "on_deadline"),
                        ({"strategy": "best-of-n"}, "strategy"),
                        ({"strategy": "sample-verify", "n": 4, "policy_samples": 2}, "must equal n=4")]:
        with pytest.raises(MmttsError, match=msg):
            RoboMonkeyPolicy(FixedPolicy(torch.zeros(1, 4, 2)), CountingVerifier([0, 0]), space, **kwargs)
    with pytest.raises(MmttsError, match="high > low"):
        ActionSpace.box([0, 1], [1, 1])
    with pytest.raises(MmttsError, match="cannot sample"):
        RoboMonkeyPolicy(object(), CountingVerifier([0, 0]), space)


def test_unmet_deadline_falls_back_to_the_first_sample_or_raises():
    samples = torch.tensor([[[0.9, 0.9], [0.0, 0.0], [0.1, -0.1], [-0.2, 0.1]]])
    space = ActionSpace.box(-1, 1, dim=2)
    slow = CountingVerifier([0.0, 0.0], delay=0.3)
    w = RoboMonkeyPolicy(FixedPolicy(samples), slow, space, n=16, policy_samples=4, deadline_s=0.2,
                         verifier_chunk=4)
    a = w.select_action(obs())
    d = w.diagnostics[-1]
    # the first chunk of 4 was scored before time ran out: the best of those wins (anytime)
    assert d.deadline_missed and not d.fallback[0] and slow.seen == 4 and d.scores[0].numel() == 4
    assert 0 <= d.chosen[0] < 4

    class SlowPolicy(FixedPolicy):
        def actions_from_noise(self, batch, noise):
            time.sleep(0.3)
            return super().actions_from_noise(batch, noise)
    w = RoboMonkeyPolicy(SlowPolicy(samples), slow, space, policy_samples=4, deadline_s=0.2)
    assert torch.equal(w.select_action(obs()), samples[:, 0])  # nothing scored in time: the first sample
    assert w.diagnostics[-1].fallback == [True]
    w = RoboMonkeyPolicy(FixedPolicy(samples), slow, space, policy_samples=4, deadline_s=0.2, on_deadline="error")
    with pytest.raises(DeadlineMissed, match="deadline of 200.0 ms"):
        w.select_action(obs())


# -- verifier training ------------------------------------------------------------------

def test_bradley_terry_margin_loss_matches_direct_computation():
    g = gen(5)
    sw, sl = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    margin = torch.rand(50, generator=g, dtype=torch.float64) * 2
    direct = np.mean([-math.log(1 / (1 + math.exp(-(a - b - m)))) for a, b, m in
                      zip(sw.tolist(), sl.tolist(), margin.tolist())])
    assert abs(float(bradley_terry_margin_loss(sw, sl, margin)) - direct) < 1e-12
    # stable where the naive form overflows
    big = bradley_terry_margin_loss(torch.tensor([0.0]), torch.tensor([1000.0]), torch.tensor([0.0]))
    assert abs(float(big) - 1000.0) < 1e-6
    # a margin demands more separation: the loss grows with it
    assert bradley_terry_margin_loss(sw, sl, margin) > bradley_terry_margin_loss(sw, sl, torch.zeros(50))


def test_synthetic_pairs_rank_by_error_to_the_demonstration():
    demo = torch.rand(30, 1, 3) * 2 - 1
    space = ActionSpace.box(-1, 1, dim=3)
    pairs = synthetic_pairs(demo, 500, gen(6), space)
    target = demo[pairs.index]
    ew = ((pairs.win - target) ** 2).flatten(1).mean(1).sqrt()
    el = ((pairs.lose - target) ** 2).flatten(1).mean(1).sqrt()
    assert (ew <= el).all() and torch.allclose(pairs.gap, el - ew)
    assert (pairs.win.abs() <= 1).all() and (pairs.lose.abs() <= 1).all()


def test_toy_trained_verifier_ranks_the_better_action_first(single_thread):
    torch.manual_seed(0)
    g = gen(7)
    w_true = torch.tensor([[0.8, -0.5], [0.3, 0.9]])
    states = torch.rand(512, 2, generator=g) * 2 - 1
    expert = torch.tanh(states @ w_true)
    scorer = MLPActionScorer(2, 2, hidden=64)
    scorer.set_normalisation(states)
    losses = train_action_verifier(scorer, {STATE: states}, expert[:, None], steps=400, lr=3e-3,
                                   space=ActionSpace.box(-1, 1, dim=2))
    assert np.mean(losses[-50:]) < np.mean(losses[:50])
    verifier = ActionVerifier(scorer)
    test = torch.rand(200, 2, generator=g) * 2 - 1
    best = torch.tanh(test @ w_true)
    near = best + 0.05 * torch.randn(200, 2, generator=g)
    far = best + 0.5 * torch.randn(200, 2, generator=g)
    s_near, s_far = verifier(near, {STATE: test}), verifier(far, {STATE: test})
    assert (s_near > s_far).float().mean() > 0.9
    # and among 8 candidates per state, its pick is nearer the expert than a random pick
    cands = best[:, None] + 0.3 * torch.randn(200, 8, 2, generator=g)
    scores = verifier(cands.reshape(-1, 2), {STATE: test.repeat_interleave(8, 0)}).reshape(200, 8)
    err = (cands - best[:, None]).norm(dim=2)
    assert err.gather(1, scores.argmax(1, keepdim=True)).mean() < 0.6 * err.mean()


def test_action_verifier_is_a_core_verifier():
    scorer = MLPActionScorer(3, 2, hidden=8)
    v = ActionVerifier(scorer)
    acts, ctx = torch.randn(5, 2), obs(5)
    s = v(acts, ctx)
    assert s.shape == (5,) and s.dtype == torch.float64
    cached = Cached(v)
    cached(acts, ctx)
    cached(acts, ctx)
    assert cached.hits == 5 and v.evaluations == 10
    ens = MeanRank([v, CountingVerifier([0.0, 0.0])])
    assert ens(acts, ctx).shape == (5,)
    with pytest.raises(MmttsError, match="observations as context"):
        v(acts)
    with pytest.raises(MmttsError, match="one observation row per candidate"):
        v(acts, obs(4))


# -- batched bookkeeping ------------------------------------------------------------------

@pytest.mark.parametrize("groups, rows", [(5, 12), (80, 100)])  # pairwise, then the sorting path
def test_batched_dedupe_matches_each_group_alone(groups, rows):
    g = gen(8)
    x = torch.randint(0, 3, (groups, rows, 2), generator=g).float()
    valid = torch.rand(groups, rows, generator=g) > 0.2
    assert (groups * rows * rows * 2 > (1 << 20)) == (groups == 80)
    for mask in (None, valid):
        keep = first_unique_mask(x, valid=mask)
        for b in range(groups):
            ok = torch.ones(rows, dtype=torch.bool) if mask is None else mask[b]
            idx = ok.nonzero().flatten()
            expected = torch.zeros(rows, dtype=torch.bool)
            expected[idx[first_unique(x[b][idx])]] = True
            assert torch.equal(keep[b], expected)
    # the same value in two groups is kept in each: rows are compared only within their group
    assert first_unique_mask(torch.zeros(3, 4, 1)).sum(1).tolist() == [1, 1, 1]
    assert distinct_rows(torch.randn(4, 16, 2, generator=g)) is None
    assert distinct_rows(x).tolist() == first_unique_mask(x).tolist()


def test_batched_selection_ignores_padding():
    scores = torch.tensor([[0.0, 5.0, float("-inf")], [float("-inf"), -1.0, -2.0]], dtype=torch.float64)
    assert Selector().select(scores, gen()).tolist() == [1, 1]
    warm = Selector("softmax", temperature=100.0)
    picks = torch.stack([warm.select(scores, gen(i)) for i in range(200)])
    assert (picks[:, 0] != 2).all() and (picks[:, 1] != 0).all()  # a -inf slot is never drawn
    assert set(picks[:, 0].tolist()) == {0, 1}
    with pytest.raises(MmttsError, match="nothing to select"):
        Selector().select(torch.full((2, 3), float("-inf"), dtype=torch.float64), gen())
    with pytest.raises(MmttsError, match="nothing to select"):
        Selector("softmax").select(torch.tensor([[0.0, 1.0], [float("-inf")] * 2], dtype=torch.float64), gen())


def test_batch_with_early_exits_and_choices_matches_one_observation_at_a_time():
    g = gen(9)
    samples = torch.randn(4, 6, 2, generator=g) * 0.4
    samples[1] = 0.25  # identical samples: one distinct candidate, no verifier call
    samples[3, :, 0] = 5.0  # the first dimension clips to the bound: duplicates only through the second
    space = ActionSpace.box(-1, 1, dim=2)
    v = CountingVerifier([0.3, -0.2])
    w = RoboMonkeyPolicy(FixedPolicy(samples), v, space, n=12, policy_samples=6, seed=3)
    a = w.select_action(obs(4))
    d = w.diagnostics[-1]
    assert d.early_exit == [False, True, False, False] and d.candidates[1] == 1
    assert v.seen == sum(c for c, e in zip(d.candidates, d.early_exit) if not e)
    assert torch.equal(a[1], torch.tensor([0.25, 0.25]))
    # the same draws, chosen observation by observation
    cands = GaussianAugmenter(space)(samples[:, :, None], step_noise(w, 0, rows=4, k=12, shape=(1, 2)))
    for b, acts in enumerate(cands.actions):
        assert acts.shape[0] == d.candidates[b]
        if d.early_exit[b]:
            assert d.scores[b] is None and d.chosen[b] == 0
            continue
        expected = -((acts[:, 0] - torch.tensor([0.3, -0.2])) ** 2).sum(1)
        assert torch.allclose(d.scores[b], expected.double())
        assert d.chosen[b] == int(expected.argmax()) and torch.equal(a[b], acts[d.chosen[b], 0])


def step_noise(wrapper, step, rows, k, shape):
    """The Gaussian step's noise at ``step`` of the wrapper's current episode: the search is seeded by (seed,
    episode, step), and each observation's K draws come from the stream of its first policy sample (candidate
    b of the run), once the policy's own noise was drawn from it."""
    streams = Streams.spawn(derive_seed(wrapper.seed, wrapper.episode, step), rows)
    streams.randn(shape[-1:])  # the policy's sample noise
    return streams.randn((k, *shape))


def test_deadline_in_a_batch_falls_back_only_where_nothing_was_scored():
    samples = torch.tensor([[[0.1, 0.1], [0.2, 0.0], [0.0, 0.3]], [[0.9, 0.9], [-0.5, 0.4], [0.3, -0.8]]])
    slow = CountingVerifier([0.0, 0.0], delay=0.3)
    w = RoboMonkeyPolicy(FixedPolicy(samples), slow, ActionSpace.box(-1, 1, dim=2), n=3, deadline_s=0.2,
                         verifier_chunk=8, strategy="sample-verify")
    a = w.select_action(obs(2))
    d = w.diagnostics[-1]
    # one chunk of 8 rows holds all 6 candidates: both observations scored in time, then the deadline passed
    assert d.deadline_missed and d.fallback == [False, False] and slow.seen == 6
    w = RoboMonkeyPolicy(FixedPolicy(samples), slow, ActionSpace.box(-1, 1, dim=2), n=3, deadline_s=0.2,
                         verifier_chunk=3, strategy="sample-verify")
    a = w.select_action(obs(2))
    d = w.diagnostics[-1]
    # the first chunk is observation 0's three candidates; observation 1 falls back to its first sample
    assert d.fallback == [False, True] and d.scores[1] is None and d.scores[0].numel() == 3
    assert torch.equal(a[1], samples[1, 0]) and torch.equal(a[0], samples[0, d.chosen[0]])


def test_all_finite_is_exact():
    assert all_finite(torch.tensor([1.0, -2.0]))
    assert not all_finite(torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([float("inf"), float("-inf")]))
    assert all_finite(torch.full((4,), 3e38))  # the sum overflows, the elements are finite


def test_action_verifier_still_ranks_nonfinite_scores_last():
    v = ActionVerifier(lambda obs, acts: torch.tensor([1.0, float("nan"), float("inf")]))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        s = v(torch.zeros(3, 2), obs(3))
    assert s.dtype == torch.float64 and s[0] == 1.0 and torch.isinf(s[1:]).all() and (s[1:] < 0).all()


def test_folded_scorer_matches_the_scorer_and_is_rebuilt_after_updates():
    torch.manual_seed(0)
    lin = torch.randn(3, 4)
    quad = torch.randn(3, 4, 4)
    feats = QuadraticFeatures(lin, quad)
    x = torch.randn(6, 4)
    direct = x @ lin.T + torch.einsum("fij,mi,mj->mf", quad, x, x)
    assert torch.allclose(feats(x), direct, atol=1e-5)
    scorer = MLPActionScorer(4, 2, hidden=16, features=feats)
    scorer.set_normalisation(torch.randn(100, 4) * 3 + 1)
    acts = torch.randn(6, 1, 2)

    def both():
        with torch.no_grad():
            folded = scorer.folded()({STATE: x}, acts)
        return folded, scorer({STATE: x}, acts).detach()
    folded, explicit = both()
    assert torch.allclose(folded, explicit, atol=1e-4)
    snapshot = scorer.folded()
    opt = torch.optim.SGD(scorer.parameters(), lr=0.5)
    scorer({STATE: x}, acts).sum().backward()
    opt.step()
    folded2, explicit2 = both()
    assert not torch.allclose(folded2, folded) and torch.allclose(folded2, explicit2, atol=1e-4)
    with torch.no_grad():  # a folded copy is a snapshot: the update does not reach it
        assert torch.equal(snapshot({STATE: x}, acts), folded)
    other = MLPActionScorer(4, 2, hidden=16, features=QuadraticFeatures(lin, quad))
    other.load_state_dict(scorer.state_dict())
    with torch.no_grad():
        assert torch.allclose(other.folded()({STATE: x}, acts), folded2, atol=1e-5)
    plain = MLPActionScorer(4, 2, hidden=16)
    plain.set_normalisation(torch.randn(100, 4) * 2)
    with torch.no_grad():
        assert torch.allclose(plain.folded()({STATE: x}, acts), plain({STATE: x}, acts), atol=1e-5)
    with pytest.raises(MmttsError, match="feature map reads states of 4"):
        MLPActionScorer(5, 2, features=feats)
    with pytest.raises(MmttsError, match="actions of 1 x 2"):
        scorer.folded()({STATE: x}, torch.randn(6, 3))


def test_action_verifier_implements_score_only():
    from mmtts.core.verifier import Verifier
    assert ActionVerifier.__call__ is Verifier.__call__
    assert "score" in ActionVerifier.__dict__
