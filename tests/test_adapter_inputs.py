"""Adapter API defects: names, cost counters, logits checks and the Fisher estimate's last chunk."""

import pytest
import torch
from torch import nn

import mmtts


def classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


@pytest.mark.parametrize("method", ["source", "bn", "alpha-bn", "tent", "eta", "eata", "deyo", "sar"])
def test_every_adapter_has_its_own_name_and_a_cost(method):
    kw = {"fisher_alpha": 0.0} if method == "eata" else {}
    ad = mmtts.adapt(classifier(), method, **kw)
    assert ad.name == method
    ad(torch.randn(4, 3, 8, 8))
    assert ad.cost.counts["samples"] == 4


@pytest.mark.parametrize("method", ["tent", "eta", "sar", "deyo"])
def test_entropy_methods_refuse_a_feature_map_as_logits(method):
    features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in features.state_dict().items()}
    with pytest.raises(mmtts.MmttsError, match=r"needs logits of shape \(4, C\).*returned \(4, 4, 6, 6\)"):
        mmtts.adapt(features, method)(torch.randn(4, 3, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in features.state_dict().items())


def test_fisher_estimate_never_makes_a_chunk_of_one():
    data = torch.randn(65, 3, 8, 8)  # 65 = 64 + 1: the last chunk would hold one sample
    ad = mmtts.adapt(classifier(), "eata", fisher_data=data, fisher_batch_size=64)
    assert ad.fisher and all(torch.isfinite(f).all() for f, _ in ad.fisher.values())


@pytest.mark.parametrize("method", ["source", "bn", "alpha-bn", "tent", "eta", "deyo", "sar"])
def test_other_precisions_and_layouts_are_converted_and_wrong_channels_refused(method):
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = mmtts.adapt(classifier(), method)(x)
    for variant in (x.double(), x.to(memory_format=torch.channels_last)):
        out = mmtts.adapt(classifier(), method)(variant)
        assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(mmtts.adapt(classifier(), method)(x.half()), ref, atol=1e-2)
    with pytest.raises(mmtts.MmttsError, match=r"takes 3 channel\(s\).*has 2 on dimension 1"):
        mmtts.adapt(classifier(), method)(x[:, :2])
    with pytest.raises(mmtts.MmttsError, match="channels last"):
        mmtts.adapt(classifier(), method)(x.permute(0, 2, 3, 1))  # (B, H, W, C) given for (B, C, H, W)
