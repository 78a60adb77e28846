"""VARProcess on tiny random models: the KV cache, re-indexing with candidates, token work, determinism."""

import pytest
import torch

import mmtts
import mmtts.strategies.tts_var  # noqa: F401  (registers tts-var)
from mmtts.core.errors import MmttsError
from mmtts.core.rng import Streams
from mmtts.core.state import State
from mmtts.modalities.var import MultiScaleVQ, NextScaleTransformer, VARProcess, sample_tokens
from mmtts.modalities.var.tokenizer import downsample

SCALES = (1, 2, 3, 4, 6, 8)
TOKENS = sum(s * s for s in SCALES)  # 130


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    tok = MultiScaleVQ(SCALES, vocab=16, code_dim=4, width=4).eval()
    with torch.no_grad():  # centre the random decoder's output in [0, 1], so that images differ after clamping
        tok.decoder[-1].bias.fill_(0.5)
    tf = NextScaleTransformer(SCALES, vocab=16, code_dim=4, width=16, depth=2, heads=2).eval()
    return tok, tf


def run_to(process, state, stage):
    while int(state.stage.max()) < stage:
        state = process.step(state)
    return state


def ink(images):
    return images.mean((1, 2, 3))


def test_cached_logits_equal_the_full_block_causal_forward(models):
    tok, tf = models
    p = VARProcess(tok, tf)
    state = run_to(p, p.init(Streams.spawn(0, 3)), len(SCALES))
    ids = [state.data["codes"][:, tf.bounds[k]:tf.bounds[k + 1]] for k in range(len(SCALES))]
    labels = torch.full((3,), tf.num_classes)
    with torch.no_grad():
        full = tf(tok.next_inputs(ids), labels)
        kv, fhat = torch.zeros(tf.cache_shape(3)), torch.zeros(3, 4, 8, 8)
        for k, s in enumerate(SCALES):
            x = None if k == 0 else downsample(fhat, s).flatten(2).transpose(1, 2)
            step = tf.forward_scale(k, x, labels, kv)
            torch.testing.assert_close(step, full[:, tf.bounds[k]:tf.bounds[k + 1]], rtol=1e-5, atol=1e-5)
            fhat = fhat + tok.lookup(ids[k], s)
    torch.testing.assert_close(fhat, state.data["fhat"])


def test_resampling_reindexes_the_cache_and_copies_continue_as_if_alone(models):
    tok, tf = models
    p = VARProcess(tok, tf)
    mid = run_to(p, p.init(Streams.spawn(7, 4)), 3)
    idx = torch.tensor([2, 2, 0, 1])
    res = mid.resample(idx)
    assert torch.equal(res.data["kv"], mid.data["kv"][idx]) and torch.equal(res.data["fhat"], mid.data["fhat"][idx])
    batched = run_to(p, res, len(SCALES))
    for j in range(4):  # every copy, the forked one included, equals a run of that copy alone
        alone = run_to(p, res.select([j]), len(SCALES))
        assert torch.equal(alone.data["codes"][0], batched.data["codes"][j])
    # the first copy keeps its parent's stream: it is candidate 2 run alone from scratch
    scratch = run_to(p, p.init(Streams(mid.streams.seeds[2:3])), len(SCALES))
    assert torch.equal(scratch.data["codes"][0], batched.data["codes"][0])
    assert not torch.equal(batched.data["codes"][0], batched.data["codes"][1])  # the fork drew its own tokens
    # the cache is what carries the prefix: an emptied cache changes the continuation
    wiped = run_to(p, res.replace(kv=torch.zeros_like(res.data["kv"])), len(SCALES))
    assert not torch.equal(wiped.data["codes"], batched.data["codes"])


def test_different_chunking_and_mixed_stages_give_the_same_samples(models):
    tok, tf = models
    p = VARProcess(tok, tf, temperature=[1.0, 1.0, 0.9, 0.9, 0.8, 0.8], top_k=8, top_p=0.9)
    whole = run_to(p, p.init(Streams.spawn(3, 6)), len(SCALES))
    parts = [run_to(p, p.init(Streams.spawn(3, m, start=a), a), len(SCALES)) for a, m in ((0, 1), (1, 3), (4, 2))]
    assert torch.equal(torch.cat([s.data["codes"] for s in parts]), whole.data["codes"])
    # candidates at different scales step in one call
    a, b = p.init(Streams.spawn(3, 2)), run_to(p, p.init(Streams.spawn(3, 4, start=2), 2), 2)
    with pytest.raises(RuntimeError):
        State.cat([a, b])  # caches of different lengths: join pads them
    mixed = p.join([a, b])
    while not bool(p.is_done(mixed).all()):  # the later candidates finish first; then step the rest
        live = (~p.is_done(mixed)).nonzero()[:, 0]
        done = p.is_done(mixed).nonzero()[:, 0]
        stepped = p.step(mixed.select(live))
        mixed = p.join([stepped, mixed.select(done)]) if len(done) else stepped
        mixed = mixed.select(torch.argsort(mixed.origin))
    assert torch.equal(mixed.data["codes"], whole.data["codes"])


def test_token_work_equals_the_tokens_the_head_processed(models):
    tok, tf = models
    seen = []
    hook = tf.head.register_forward_hook(lambda mod, inp, out: seen.append(out.shape[0] * out.shape[1]))
    try:
        for guidance, per in ((1.0, 1), (2.0, 2)):
            seen.clear()
            p = VARProcess(tok, tf, label=3 if guidance != 1 else None, guidance=guidance)
            assert p.nfe_per_candidate() == per * TOKENS
            res = mmtts.search(p, ink, "best-of-n", budget=5 * per * TOKENS, seed=0, batch_size=2)
            assert res.budget["nfe"] == sum(seen) == p.work["tokens"] == 5 * per * TOKENS
            assert p.work["forwards"] == 5 * per * len(SCALES)
            seen.clear()
            res = mmtts.search(p, ink, "tts-var", budget=8 * per * TOKENS, seed=0, features=lambda x: x.flatten(1))
            assert res.budget["nfe"] == sum(seen) <= 8 * per * TOKENS
    finally:
        hook.remove()
    greedy_last = VARProcess(tok, tf, top_k=[0, 0, 0, 0, 0, 1])
    assert [greedy_last.is_stochastic(k) for k in range(6)] == [True] * 5 + [False]
    f = VARProcess(tok, tf, unit="forwards")
    assert f.nfe_per_candidate() == len(SCALES)
    assert VARProcess(tok, tf, unit="forwards", label=1, guidance=[1, 1, 1, 1, 1, 3]).nfe_per_candidate() == 12


def test_sampling_knobs():
    logits = torch.tensor([[[0.0, 2.0, 1.0, -1.0]]])
    probs = logits.double().softmax(-1)[0, 0]
    cdf = probs.cumsum(0)
    for u, want in ((0.0, 0), (float(cdf[0]) + 1e-9, 1), (float(cdf[2]) + 1e-9, 3), (0.999999, 3)):
        assert int(sample_tokens(logits, torch.tensor([[u]]))) == want
    for u in (0.0, 0.5, 0.99):  # top-k 1 and a tiny nucleus keep only the most likely token
        assert int(sample_tokens(logits, torch.tensor([[u]]), top_k=1)) == 1
        assert int(sample_tokens(logits, torch.tensor([[u]]), top_p=0.1)) == 1
    # top-k 2 renormalises over tokens 1 and 2
    p2 = probs[[1, 2]] / probs[[1, 2]].sum()
    assert int(sample_tokens(logits, torch.tensor([[float(p2[0]) - 1e-6]]), top_k=2)) == 1
    assert int(sample_tokens(logits, torch.tensor([[float(p2[0]) + 1e-6]]), top_k=2)) == 2


def test_other_strategies_run_on_the_process_unchanged(models):
    tok, tf = models
    p = VARProcess(tok, tf)
    for name, kw in (("beam", {"beams": 2}), ("particle-filter", {"potential": "max", "lmbda": 1.0}),
                     ("best-of-n", {})):
        a = mmtts.search(p, ink, name, budget=6 * TOKENS, seed=4, **kw)
        b = mmtts.search(p, ink, name, budget=6 * TOKENS, seed=4, **kw)
        assert a.budget["nfe"] <= 6 * TOKENS
        assert torch.equal(a.outputs, b.outputs) and a.best_score == b.best_score


def test_bad_process_settings(models):
    tok, tf = models
    with pytest.raises(MmttsError, match="guidance needs a label"):
        VARProcess(tok, tf, guidance=2.0)
    with pytest.raises(MmttsError, match="temperature has 2 values for 6 scales"):
        VARProcess(tok, tf, temperature=[1.0, 1.0])
    with pytest.raises(MmttsError, match="unknown unit"):
        VARProcess(tok, tf, unit="flops")
    with pytest.raises(MmttsError, match="label 12 is not a class"):
        VARProcess(tok, tf, label=12)
