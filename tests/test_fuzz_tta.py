"""Property-based fuzzing of the test-time adapters.

Batches of random shape (batch size 0, 1 and more; wrong channel counts;
channels-last layouts), dtype (float32/64/16, integers, bool) and content
(NaN, inf, huge values) go through every adapter. Each property is: the call
either returns finite (B, C) logits, or raises an
:class:`~mmtts.core.errors.MmttsError`, and when it raises, the model's
parameters, buffers and modes are exactly as before the call; never a raw
torch or Python error. Example counts follow the hypothesis profile
registered in conftest.py (``ci`` by default, ``HYPOTHESIS_PROFILE=long``).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from torch import nn

import mmtts
from mmtts.core.errors import MmttsError

METHODS = ["source", "bn", "alpha-bn", "tent", "eta", "deyo", "sar"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.uint8, torch.bool]


def classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 5))


def snapshot(model: nn.Module) -> dict:
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "training": [m.training for m in model.modules()]}


def unchanged(model: nn.Module, before: dict) -> bool:
    now = model.state_dict()
    same = all(torch.equal(before["state"][k], now[k]) for k in now)
    return same and before["training"] == [m.training for m in model.modules()]


@st.composite
def batches(draw):
    b = draw(st.sampled_from([0, 1, 2, 3, 8, 8, 8]))
    c = draw(st.sampled_from([3] * 6 + [1, 4]))
    side = draw(st.sampled_from([4, 7, 8]))
    x = torch.randn(b, c, side, side, generator=torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16))))
    kind = draw(st.sampled_from(["plain"] * 5 + ["nan", "inf", "huge", "channels_last", "nhwc"]))
    if kind == "nan" and x.numel():
        x.view(-1)[0] = float("nan")
    elif kind == "inf" and x.numel():
        x.view(-1)[-1] = float("inf")
    elif kind == "huge":
        x = x * 1e30
    elif kind == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif kind == "nhwc":
        x = x.permute(0, 2, 3, 1)
    dtype = draw(st.sampled_from([torch.float32] * 4 + DTYPES))
    return x.to(dtype) if dtype != torch.bool else x > 0


@pytest.mark.parametrize("method", METHODS)
@given(x=batches())
def test_adapter_answers_or_refuses_and_leaves_the_model_alone(method, x):
    model = classifier()
    ad = mmtts.adapt(model, method)
    before = snapshot(model)
    try:
        out = ad(x)
    except MmttsError:
        event("refused")
        assert unchanged(model, before)
        return
    event("answered")
    assert out.shape == (x.shape[0], 5)
    assert out.dtype == torch.float32
    finite_input = bool(torch.isfinite(x.float()).all())
    if finite_input and float(x.float().abs().max()) < 1e6:
        assert bool(torch.isfinite(out).all())


@given(x=batches(), episodic=st.booleans())
def test_reset_after_any_call_restores_the_source_model(x, episodic):
    model = classifier()
    ad = mmtts.adapt(model, "tent", episodic=episodic)
    before = snapshot(model)
    try:
        ad(x)
    except MmttsError:
        pass
    ad.reset()
    assert all(torch.equal(before["state"][k], v) for k, v in model.state_dict().items())
