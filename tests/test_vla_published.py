"""RoboMonkey's published augmentation (``published=True``) on hand-made batches, against the mmtts default."""

import pytest
import torch

import mmtts.strategies.robomonkey  # noqa: F401  (registration)
from mmtts.core.errors import MmttsError
from mmtts.modalities.vla.augment import GaussianAugmenter
from mmtts.modalities.vla.space import ActionSpace
from mmtts.strategies.robomonkey import RoboMonkey

SPACE = ActionSpace(low=torch.tensor([-1.0, 0.0]), high=torch.tensor([1.0, 1.0]), discrete=[1])


def batch(*rows):
    """(B=1, N, H=1, D=2) samples from N (arm, gripper) rows."""
    return torch.tensor(rows, dtype=torch.float32)[None, :, None, :]


def test_published_spread_divides_by_n_as_np_var():
    samples = batch([0.0, 0.0], [0.5, 0.0])
    noise = torch.ones(1, 1, 1, 2)
    default = GaussianAugmenter(SPACE)(samples, noise)
    published = GaussianAugmenter(SPACE, published=True)(samples, noise)
    x = samples[0, :, 0, 0].numpy()
    assert float(published.std[0, 0, 0]) == pytest.approx(float(x.std(ddof=0)))  # np.var's spread: 0.25
    assert float(default.std[0, 0, 0]) == pytest.approx(float(x.std(ddof=1)))
    assert float(published.actions[0][0, 0, 0]) == pytest.approx(0.25 + 0.25)


def test_published_gripper_is_high_iff_the_sample_mean_is():
    samples = batch([0.0, 0.0], [0.0, 0.99608])  # an even-N tie: mean 0.498 < 0.5, half the samples >= 0.5
    noise = torch.zeros(1, 3, 1, 2)
    assert float(GaussianAugmenter(SPACE, published=True)(samples, noise).actions[0][0, 0, 1]) == 0.0
    assert float(GaussianAugmenter(SPACE)(samples, noise).actions[0][0, 0, 1]) == 1.0  # majority, ties high
    assert SPACE.vote(samples, rule="mean").item() == 0.0 and SPACE.vote(samples).item() == 1.0
    with pytest.raises(MmttsError, match="unknown vote rule"):
        SPACE.vote(samples, rule="median")


def test_published_returns_the_raw_sample_when_all_samples_agree():
    samples = batch([1.5, 0.3], [1.5, 0.3])  # out of bounds and not a gripper value: the raw sample comes back
    noise = torch.randn(1, 4, 1, 2, generator=torch.Generator().manual_seed(0))
    published = GaussianAugmenter(SPACE, published=True)(samples, noise)
    assert published.counts == [1] and torch.equal(published.actions[0][0], samples[0, 0])
    default = GaussianAugmenter(SPACE)(samples, noise)
    assert torch.equal(default.actions[0][0], torch.tensor([[1.0, 0.0]]))  # clipped and voted


def test_the_strategy_takes_the_preset_and_refuses_non_bools():
    assert RoboMonkey(published=True).settings["published"] is True
    assert RoboMonkey().settings["published"] is False
    with pytest.raises(MmttsError, match="published"):
        RoboMonkey(published="yes")


def test_token_bin_de_duplication_when_an_action_tokenizer_is_given():
    from mmtts.modalities.vla.tokens import ActionTokenizer
    tok = ActionTokenizer(SPACE, bins=256, vocab_size=300)  # bins of width 2/256 on the arm
    samples = batch([0.0, 0.0], [0.002, 0.0])  # both arm values in bin 128
    noise = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])[None, :, None, :]  # means 0.001 -/+ 0.001
    floats = GaussianAugmenter(SPACE, published=True)(samples, noise)
    bins = GaussianAugmenter(SPACE, published=True, tokenizer=tok)(samples, noise)
    assert floats.counts == [3]  # 0.001, 0.002, 0.0: three distinct floats
    assert bins.counts == [1] and torch.equal(bins.actions[0], floats.actions[0][:1])  # one bin: the first kept
    assert tok.encode(floats.actions[0])[:, 0, 0].unique().numel() == 1
    with pytest.raises(MmttsError, match="ActionTokenizer"):
        GaussianAugmenter(SPACE, tokenizer="bins")


def test_published_robomonkey_de_duplicates_on_the_token_policy_bins():
    from types import SimpleNamespace

    from mmtts.core.rng import Streams
    from mmtts.modalities.vla.tokens import ActionTokenizer
    tok = ActionTokenizer(SPACE, bins=256, vocab_size=300)
    samples = batch([0.0, 0.0], [0.002, 0.0])
    ctx = SimpleNamespace(process=SimpleNamespace(space=SPACE, policy=SimpleNamespace(tokenizer=tok)))
    state = SimpleNamespace(streams=Streams.spawn(5, 2))  # what candidates() reads of the state
    published, _ = RoboMonkey(n=8, published=True).candidates(ctx, state, samples, None)
    default, _ = RoboMonkey(n=8).candidates(ctx, state, samples, None)
    explicit, _ = RoboMonkey(n=8, tokenizer=tok).candidates(ctx, state, samples, None)
    assert published.counts[0] < default.counts[0] == 8
    assert explicit.counts == published.counts
