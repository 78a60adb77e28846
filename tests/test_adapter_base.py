import pytest
import torch
from torch import nn

import mmtts
from mmtts.core.adapter import Adapter, select_norm_modules, unfreeze_batchnorm


def small_net(norm="bn"):
    layer = {"bn": lambda c: nn.BatchNorm2d(c), "gn": lambda c: nn.GroupNorm(2, c)}[norm]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), layer(4), nn.ReLU(), nn.Conv2d(4, 6, 3), layer(6),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    # non-trivial source statistics
    net.train()
    with torch.no_grad():
        for _ in range(5):
            net(torch.randn(16, 3, 8, 8) * 2 + 1)
    return net.eval()


class EntropySGD(Adapter):
    """A minimal gradient method used to exercise snapshot/reset of the base class."""

    def configure_model(self):
        super().configure_model()
        self.use_batch_statistics()

    def collect_params(self):
        return self.norm_affine_params()

    def build_optimizer(self, params):
        return torch.optim.Adam(params, lr=0.05)

    def forward_and_adapt(self, x):
        logits = self.model(x)
        loss = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return logits.detach()


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_registry_lists_the_foundation_adapters():
    assert {"source", "bn"} <= set(mmtts.list_adapters())
    with pytest.raises(mmtts.core.UnknownNameError, match="valid adapter names"):
        mmtts.adapt(small_net(), "tnet")


def test_module_selection_by_kind_and_name():
    net = small_net()
    names = [n for n, _ in select_norm_modules(net, ["batchnorm"])]
    assert names == ["1", "4"]
    assert [n for n, _ in select_norm_modules(net, ["batchnorm"], include=["4"])] == ["4"]
    assert [n for n, _ in select_norm_modules(net, ["batchnorm"], exclude=["1"])] == ["4"]
    assert select_norm_modules(net, ["layernorm"]) == []


def test_reset_is_bit_exact_after_ten_steps_and_touches_only_adapted_tensors():
    net = small_net()
    before = state_of(net)
    ad = EntropySGD(net)
    assert sorted(ad.adapted_names()) == sorted(
        ["1.weight", "1.bias", "4.weight", "4.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
         "4.running_mean", "4.running_var", "4.num_batches_tracked"])
    for _ in range(10):
        ad(torch.randn(8, 3, 8, 8))
    assert not torch.equal(net[1].weight, before["1.weight"])
    assert torch.equal(net[0].weight, before["0.weight"])  # conv weights are never trainable here
    ad.reset()
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(len(s) == 0 for s in ad.optimizer.state.values()) or not ad.optimizer.state
    # after reset the adapter repeats its first step exactly
    x = torch.randn(8, 3, 8, 8)
    a = ad(x)
    ad.reset()
    assert torch.equal(ad(x), a)


def test_episodic_mode_does_not_leak():
    net = small_net()
    ad = EntropySGD(net, episodic=True)
    x, y = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)
    first = ad(x)
    ad(y)
    assert torch.equal(ad(x), first)


def test_release_restores_modes_and_flags():
    net = small_net().train()
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    ad = EntropySGD(net)
    assert not net[1].training and not net[0].weight.requires_grad and net[1].weight.requires_grad
    assert net[1].track_running_stats and "forward" not in net[1].__dict__  # batch statistics only inside a call
    m = ad.release()
    assert m is net and all(mod.training for mod in net.modules())
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags


def test_bn_adapter_equals_train_mode_batchnorm_and_keeps_buffers():
    net = small_net()
    ref = small_net().train()
    buffers = state_of(net)
    x = torch.randn(10, 3, 8, 8)
    out = mmtts.adapt(net, "bn")(x)
    with torch.no_grad():
        expected = ref(x)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(net[1].running_mean, buffers["1.running_mean"])


def test_models_without_norm_layers_and_frozen_batchnorm():
    plain = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(mmtts.MmttsError, match="found nothing to adapt.*'source'"):
        mmtts.adapt(plain, "bn")
    x = torch.randn(2, 3, 2, 2)
    assert torch.equal(mmtts.adapt(plain, "source")(x), plain(x))
    from torchvision.ops.misc import FrozenBatchNorm2d
    frozen = nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4))
    with torch.no_grad():
        frozen[1].running_mean.uniform_(-1, 1)
        frozen[1].running_var.uniform_(0.5, 2)
        frozen[1].weight.uniform_(0.5, 2)
    with pytest.raises(mmtts.MmttsError, match="FrozenBatchNorm2d.*unfreeze_batchnorm"):
        mmtts.adapt(frozen, "bn")
    x = torch.randn(4, 3, 5, 5)
    expected = frozen(x)
    unfreeze_batchnorm(frozen)
    assert isinstance(frozen[1], nn.BatchNorm2d)
    assert torch.allclose(frozen(x), expected, atol=1e-5)


def test_groupnorm_models_are_selected():
    ad = EntropySGD(small_net("gn"))
    assert [n for n, _ in ad.params] == ["1.weight", "1.bias", "4.weight", "4.bias"]
    out = ad(torch.randn(1, 3, 8, 8))  # batch of one is fine for GroupNorm
    assert out.shape == (1, 5)
