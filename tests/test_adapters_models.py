"""The adapters on models built by timm and torchvision (random weights, built from their configs)."""

import pytest
import torch

import mmtts
from mmtts.core.adapter import unfreeze_batchnorm


def test_tent_and_sar_adapt_the_layernorms_of_a_timm_vit_one_image_at_a_time():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    for method, kw in (("tent", {}), ("sar", {"entropy_margin": 1.01})):
        ad = mmtts.adapt(vit, method, lr=0.05, **kw)
        assert ad.params and all(".norm" in n or n.startswith("norm") for n, _ in ad.params)
        for _ in range(3):
            ad(torch.randn(1, 3, 32, 32))
        assert any(not torch.equal(v, before[k]) for k, v in vit.state_dict().items())
        ad.reset()
        ad.release()
        assert all(torch.equal(v, before[k]) for k, v in vit.state_dict().items())


def test_torchvision_frozen_batchnorm_is_explained_and_convertible():
    from torchvision.models import resnet18
    from torchvision.ops.misc import FrozenBatchNorm2d

    net = resnet18(weights=None, num_classes=10, norm_layer=FrozenBatchNorm2d).eval()
    with pytest.raises(mmtts.MmttsError, match="FrozenBatchNorm2d.*unfreeze_batchnorm"):
        mmtts.adapt(net, "tent")
    ad = mmtts.adapt(unfreeze_batchnorm(net), "eta", lr=0.01)
    assert len(ad.params) == 2 * 20  # weight and bias of resnet18's 20 BatchNorm layers
    assert ad(torch.randn(4, 3, 32, 32)).shape == (4, 10)


def test_published_deyo_skips_resnet_layer4_and_the_last_vit_blocks():
    from timm.models.vision_transformer import VisionTransformer
    from torchvision.models import resnet18

    net = resnet18(weights=None, num_classes=10).eval()
    assert len(mmtts.adapt(net, "deyo").params) == 40
    published = mmtts.adapt(net, "deyo", published=True)
    assert len(published.params) == 30 and not any("layer4" in n for n, _ in published.params)
    published.release()
    assert len(mmtts.adapt(net, "tent", published=True).params) == 40  # TENT's published code skips nothing
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=12, num_heads=2, num_classes=10).eval()
    names = [n for n, _ in mmtts.adapt(vit, "deyo", published=True).params]
    assert names == [f"blocks.{b}.{k}.{p}" for b in range(9) for k in ("norm1", "norm2") for p in ("weight", "bias")]
