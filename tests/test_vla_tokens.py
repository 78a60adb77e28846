"""The transformers token-policy adapter on a tiny randomly initialised Llama."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mmtts.core.errors import MmttsError  # noqa: E402
from mmtts.modalities.vla import ActionSpace, ActionVerifier, MLPActionScorer, RoboMonkeyPolicy  # noqa: E402
from mmtts.modalities.vla.tokens import ActionTokenizer, TokenActionPolicy  # noqa: E402

VOCAB, BINS, STATE_DIM = 96, 32, 4
SPACE = ActionSpace.box([-1.0, -2.0, 0.0], [1.0, 2.0, 1.0], discrete=[2])


@pytest.fixture(scope="module")
def model():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def state_prompt(batch):
    """Bin the state into the first 32 token ids: a stand-in for a VLM processor."""
    s = batch["observation.state"].clamp(-1, 1)
    return ((s + 1) / 2 * 31).round().long()


def test_tokenizer_round_trip_is_within_half_a_bin():
    tok = ActionTokenizer(SPACE, BINS, VOCAB)
    lo, hi = SPACE.bounds(torch.zeros(1, dtype=torch.float64))
    a = lo + (hi - lo) * torch.rand(500, 3, dtype=torch.float64)
    ids = tok.encode(a)
    assert ids.min() >= VOCAB - BINS and ids.max() < VOCAB
    assert ((tok.decode(ids) - a).abs() <= (hi - lo) / BINS / 2 + 1e-12).all()
    assert tok.encode(torch.tensor([[5.0, -9.0, 0.5]])).tolist()[0][:2] == [VOCAB - 1, VOCAB - BINS]  # clipped
    with pytest.raises(MmttsError, match="outside the action range"):
        tok.decode(torch.tensor([[3, 70, 70]]))


def test_token_policy_samples_bin_centres_in_one_seeded_batch(model):
    policy = TokenActionPolicy(model, ActionTokenizer(SPACE, BINS, VOCAB), state_prompt)
    batch = {"observation.state": torch.rand(2, STATE_DIM) * 2 - 1}
    a = policy.sample_actions(batch, 5, torch.Generator().manual_seed(0))
    assert a.shape == (2, 5, 3)
    lo, hi = SPACE.bounds(a)
    assert ((a >= lo) & (a <= hi)).all()
    centres = ActionTokenizer(SPACE, BINS, VOCAB).decode(torch.arange(VOCAB - BINS, VOCAB)[:, None].expand(-1, 3))
    for d in range(3):
        assert torch.isin(a[..., d].double(), centres[:, d]).all()
    assert torch.equal(a, policy.sample_actions(batch, 5, torch.Generator().manual_seed(0)))
    assert not torch.equal(a, policy.sample_actions(batch, 5, torch.Generator().manual_seed(1)))


def test_greedy_decode_with_the_cache_matches_recomputing_the_prefix(model):
    tok = ActionTokenizer(SPACE, BINS, VOCAB)
    policy = TokenActionPolicy(model, tok, state_prompt, temperature=0.0, horizon=2)
    batch = {"observation.state": torch.rand(3, STATE_DIM) * 2 - 1}
    a = policy.sample_actions(batch, 1, torch.Generator())
    assert a.shape == (3, 1, 2, 3)
    ids = state_prompt(batch)
    allowed = tok.token_ids
    with torch.no_grad():
        for _ in range(6):
            nxt = allowed[model(input_ids=ids).logits[:, -1, allowed].argmax(1)]
            ids = torch.cat([ids, nxt[:, None]], 1)
    expected = tok.decode(ids[:, -6:].reshape(3, 1, 2, 3)).float()
    assert torch.equal(a, expected)


def test_wrapper_over_a_token_policy(model):
    policy = TokenActionPolicy(model, ActionTokenizer(SPACE, BINS, VOCAB), state_prompt)
    verifier = ActionVerifier(MLPActionScorer(STATE_DIM, 3, hidden=8))
    w = RoboMonkeyPolicy(policy, verifier, SPACE, n=8, policy_samples=4)
    a = w.select_action({"observation.state": torch.zeros(2, STATE_DIM)})
    assert a.shape == (2, 3) and torch.isfinite(a).all()
    assert set(a[:, 2].tolist()) <= {0.0, 1.0}  # the gripper is voted to a valid value


def test_token_samples_from_streams_do_not_depend_on_the_rows_beside_them(model):
    from mmtts.core.rng import Streams
    policy = TokenActionPolicy(model, ActionTokenizer(SPACE, BINS, VOCAB), state_prompt)
    batch = {"observation.state": torch.rand(4, STATE_DIM, generator=torch.Generator().manual_seed(2)) * 2 - 1}
    noise = policy.draw_noise(Streams.spawn(5, 4), SPACE)
    assert noise.shape == (4, 3) and noise.dtype == torch.float64 and ((noise >= 0) & (noise < 1)).all()
    together = policy.actions_from_noise(batch, noise)
    alone = torch.cat([policy.actions_from_noise({"observation.state": batch["observation.state"][i:i + 1]},
                                                 noise[i:i + 1]) for i in range(4)])
    assert together.shape == (4, 3) and torch.equal(together, alone)
    # the first token inverts its distribution: a uniform number of 0 takes the lowest bin, near 1 the highest
    lo = policy.actions_from_noise(batch, torch.zeros(4, 3, dtype=torch.float64))
    hi = policy.actions_from_noise(batch, torch.full((4, 3), 1 - 1e-12, dtype=torch.float64))
    assert (lo[:, 0] <= together[:, 0]).all() and (together[:, 0] <= hi[:, 0]).all()
    assert (lo[:, 0] < hi[:, 0]).all()


def test_vocabulary_mismatch_is_an_error(model):
    with pytest.raises(MmttsError, match="vocabulary"):
        TokenActionPolicy(model, ActionTokenizer(SPACE, BINS, VOCAB + 1), state_prompt)
