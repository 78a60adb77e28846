"""Video verifiers: image verifiers lifted to frames, temporal consistency, per-depth judging."""

import pytest
import torch

import mmtts
from mmtts.core import FunctionVerifier, MmttsError
from mmtts.core.errors import VerifierError
from mmtts.verifiers.video import FrameVerifier, PerDepth, TemporalConsistency

BRIGHT = FunctionVerifier(lambda x: x.mean((1, 2, 3)), name="bright")


def clips():
    v = torch.zeros(2, 1, 3, 4, 4)
    v[0, :, 0], v[0, :, 1], v[0, :, 2] = 0.2, 0.4, 0.9  # clip 0: frame means 0.2, 0.4, 0.9
    v[1] = 0.5                                       # clip 1: still at 0.5
    return v


def test_frames_mean_and_min_reduce_the_per_frame_scores():
    v = clips()
    assert torch.allclose(FrameVerifier(BRIGHT)(v), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(FrameVerifier(BRIGHT, reduce="min")(v), torch.tensor([0.2, 0.5], dtype=torch.float64))
    lifted = FrameVerifier(BRIGHT)
    before = BRIGHT.evaluations
    lifted(v)
    assert lifted.evaluations - before == 6 == BRIGHT.evaluations - before  # one per frame scored


def test_frames_repeat_each_candidates_context_for_its_frames():
    seen = {}

    def fn(x, ctx):
        seen.update(ctx)
        return x.mean((1, 2, 3))

    FrameVerifier(FunctionVerifier(fn, takes_context=True))(clips(), {"label": torch.tensor([3, 7]),
                                                                       "prompt": ["a", "b"], "shared": 1})
    assert seen["label"].tolist() == [3, 3, 3, 7, 7, 7] and seen["prompt"] == list("aaabbb") and seen["shared"] == 1


def test_temporal_consistency():
    v = clips()
    s = TemporalConsistency()(v)
    assert s[1] == 0 and torch.isclose(s[0], torch.tensor(-(0.2 ** 2 + 0.5 ** 2) / 2, dtype=torch.float64))
    assert float(TemporalConsistency()(v[:, :, :1]).abs().sum()) == 0
    feat = TemporalConsistency(features=lambda f: f.mean((1, 2, 3))[:, None])(v)
    assert torch.allclose(feat, s)  # constant frames: features = pixels


def test_registered_names():
    assert mmtts.create_verifier("frames", verifier=BRIGHT, reduce="min").reduce == "min"
    assert isinstance(mmtts.create_verifier("temporal-consistency"), TemporalConsistency)
    assert isinstance(mmtts.create_verifier("per-depth", verifiers={1: BRIGHT}), PerDepth)


def test_bad_input_is_refused():
    wrong = FunctionVerifier(lambda x: torch.zeros(len(x) - 1), name="short")
    with pytest.raises(VerifierError, match="short"):
        FrameVerifier(wrong)(clips())
    with pytest.raises(MmttsError, match="video batches"):
        FrameVerifier(BRIGHT)(torch.zeros(2, 1, 4, 4))
    with pytest.raises(MmttsError, match="zero frames"):
        TemporalConsistency()(torch.zeros(2, 1, 0, 4, 4))
    with pytest.raises(MmttsError, match="reduce"):
        FrameVerifier(BRIGHT, reduce="max")
    with pytest.raises(MmttsError, match="frame counts"):
        PerDepth({0: BRIGHT})
