"""BatchNorm in the adapters: one definition (mmtts.kernels) on every device, equal to PyTorch's, never left patched."""

import importlib

import pytest
import torch
from torch import nn

import mmtts
import mmtts.kernels.batchnorm as kbn
import mmtts.kernels.stats as kstats
from mmtts.kernels import batch_norm

BN_ADAPTERS = ["bn", "alpha-bn", "tent", "eta", "eata", "sar", "deyo"]
#: settings under which every gradient method takes a step on the test batches
STEPPING = {"tent": {"lr": 0.05}, "sar": {"lr": 0.05, "entropy_margin": 1.01},
            "deyo": {"lr": 0.05, "filter_entropy": False, "plpd_threshold": -1.0},
            "eta": {"lr": 0.05, "filter_entropy": False}, "eata": {"lr": 0.05, "filter_entropy": False}}


def net(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3),
                      nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    m.train()
    with torch.no_grad():
        for _ in range(5):
            m(torch.randn(16, 3, 8, 8) * 2 + 1)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
    return m.eval()


def make(method, model, **kw):
    if method == "eata":
        kw.setdefault("fisher_data", torch.randn(16, 3, 8, 8))
    return mmtts.adapt(model, method, **{**STEPPING.get(method, {}), **kw})


def batch(size=8, seed=1):
    return torch.randn(size, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.5


def patched(model):
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


# -- one definition ------------------------------------------------------------------------------------


def test_the_adapters_module_of_normalization_math_is_gone():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("mmtts.adapters.norm_math")


def test_the_cpu_path_and_the_kernel_reference_are_one_function():
    from mmtts.kernels import batch_norm_stats_reference

    assert kbn.batch_norm_stats is kstats.batch_norm_stats  # what batch_norm's reference path computes with
    assert batch_norm_stats_reference is kstats.batch_norm_stats_reference  # what the kernel tests compare to
    from mmtts.kernels import batch_norm_layer

    assert batch_norm_layer is kbn.batch_norm_layer


@pytest.mark.parametrize("method", BN_ADAPTERS)
def test_every_bn_adapter_normalizes_through_the_kernels_reference_on_the_cpu(method, monkeypatch):
    calls = {"reference": 0, "native": 0}
    reference, native = kstats.batch_norm_stats_reference, torch.nn.functional.batch_norm

    def counted_reference(x):
        calls["reference"] += 1
        return reference(x)

    def counted_native(*a, **kw):
        calls["native"] += 1
        return native(*a, **kw)

    layers = []
    model = net()
    ad = make(method, model)
    for _, m in ad.norm_modules:
        m.register_forward_pre_hook(lambda mod, args: layers.append(mod.forward))
    monkeypatch.setattr(kstats, "batch_norm_stats_reference", counted_reference)
    monkeypatch.setattr(torch.nn.functional, "batch_norm", counted_native)
    ad(batch())
    assert calls["native"] == 0
    assert calls["reference"] > 0 and calls["reference"] % 2 == 0  # every forward, both BatchNorm layers
    assert layers and all(f.func is kbn.batch_norm_layer for f in layers)


# -- equal to PyTorch's BatchNorm --------------------------------------------------------------------------


SHAPES = [(7, 5), (3, 5, 11), (1, 5, 11), (2, 5, 3, 7), (1, 5, 4, 4), (2, 5, 3, 1, 5), (1, 5, 1, 1, 2)]
LAYERS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _layer(shape, momentum=0.3):
    torch.manual_seed(0)
    bn = LAYERS[len(shape)](shape[1], momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


def _outputs_and_grads(fn, x, bn, dy):
    x = x.clone().requires_grad_()
    y = fn(x)
    return (y, *torch.autograd.grad(y, (x, bn.weight, bn.bias), dy))


@pytest.mark.parametrize("shape", SHAPES)
def test_training_mode_equals_nn_batchnorm_outputs_gradients_and_running_buffers(shape):
    g = torch.Generator().manual_seed(3)
    x, dy = torch.randn(shape, generator=g) * 3 + 2, torch.randn(shape, generator=g)
    ref, ours = _layer(shape).train(), _layer(shape)
    rm, rv = ours.running_mean.clone(), ours.running_var.clone()
    want = _outputs_and_grads(ref, x, ref, dy)
    got = _outputs_and_grads(lambda t: batch_norm(t, rm, rv, ours.weight, ours.bias, training=True, momentum=0.3),
                             x, ours, dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm, ref.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv, ref.running_var, rtol=1e-6, atol=1e-6)  # the unbiased variance enters


@pytest.mark.parametrize("shape", SHAPES)
def test_the_adapters_layer_forward_equals_nn_batchnorm_and_leaves_the_buffers(shape):
    g = torch.Generator().manual_seed(4)
    x, dy = torch.randn(shape, generator=g) * 3 + 2, torch.randn(shape, generator=g)
    bn = _layer(shape)
    buffers = [b.clone() for b in bn.buffers()]
    for source_weight, mode in ((0.0, True), (1.0, False)):
        bn.train(mode)
        want = _outputs_and_grads(bn, x, bn, dy)
        bn.eval()
        got = _outputs_and_grads(lambda t: kbn.batch_norm_layer(bn, t, source_weight=source_weight), x, bn, dy)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for b, before in zip(bn.buffers(), buffers):
            if mode:  # nn.BatchNorm in training mode wrote them; ours never does
                b.copy_(before)
    assert all(torch.equal(b, before) for b, before in zip(bn.buffers(), buffers))


def test_one_value_per_channel_is_refused_like_pytorch():
    bn = _layer((1, 5))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn.train()(torch.randn(1, 5))
    with pytest.raises(ValueError, match="more than 1 value per channel.*training=False"):
        kbn.batch_norm_layer(bn, torch.randn(1, 5))
    assert kbn.batch_norm_layer(bn, torch.randn(1, 5), source_weight=1.0).shape == (1, 5)


def test_the_statistics_keep_a_small_variance_under_a_large_mean():
    x = torch.randn(4, 3, 1500, dtype=torch.float64) * 0.01 + 1000
    got = kstats.batch_norm_stats_reference(x.float())
    torch.testing.assert_close(got.var.double(), x.var(dim=(0, 2), unbiased=False), rtol=2e-3, atol=0)


def test_tent_equals_the_published_recipe_on_pytorch_batchnorm():
    """The reference TENT: BatchNorm in training mode without running statistics, Adam on the affine parameters."""
    ref = net()
    ref.train().requires_grad_(False)
    params = []
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
            m.requires_grad_(True)
            params += [m.weight, m.bias]
    opt = torch.optim.Adam(params, lr=1e-2, betas=(0.9, 0.999))
    tent = mmtts.adapt(net(), "tent", lr=1e-2)
    for seed in range(5):
        x = batch(seed=seed)
        logits = ref(x)
        loss = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(tent(x), logits.detach(), rtol=1e-5, atol=1e-5)
    for (_, p), q in zip(tent.params, params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-5)


# -- the patch lives only while the adapter runs -------------------------------------------------------


def test_an_adapter_that_raised_leaves_the_model_plain_and_a_later_adapter_works():
    model, x = net(), batch()
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(mmtts.MmttsError, match="batch of 1"):
        mmtts.adapt(model, "bn")(x[:1])
    assert patched(model) == []
    with torch.no_grad():
        assert torch.equal(model(x), expected)  # eval mode, source statistics
    later, fresh = mmtts.adapt(model, "tent", lr=0.05), mmtts.adapt(net(), "tent", lr=0.05)
    for seed in range(3):
        assert torch.equal(later(batch(seed=seed)), fresh(batch(seed=seed)))


@pytest.mark.parametrize("method", BN_ADAPTERS)
def test_no_patch_outlives_a_call_or_an_error_inside_it(method):
    model, x = net(), batch()
    with torch.no_grad():
        expected = model(x)
    ad = make(method, model)
    ad(x)
    assert patched(model) == []
    if method in ("bn", "alpha-bn"):  # nothing else changed: between calls the model is the source model
        with torch.no_grad():
            assert torch.equal(model(x), expected)

    def fail(mod, args):
        raise RuntimeError("failure inside the model")

    hook = model[4].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="failure inside the model"):
        ad(x)
    hook.remove()
    assert patched(model) == []


def test_a_user_forward_override_comes_back_after_the_call():
    model = net()
    own = model[1].forward
    model[1].forward = own  # an instance-level forward set by the caller
    ad = mmtts.adapt(model, "bn")
    ad(batch())
    assert model[1].__dict__["forward"] is own


@pytest.mark.parametrize("method,kw,match", [
    ("tent", {}, "affine"), ("eata", {"fisher_data": None}, "fisher_data"),
    ("eata", {"fisher_data": torch.randn(4, 8, 8)}, r"expects a batch of shape \(N, C, H, W\)"),
])
def test_an_adapter_that_fails_to_build_leaves_modes_and_flags_unchanged(method, kw, match):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=method != "tent"), nn.Flatten())
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(mmtts.MmttsError, match=match):
        mmtts.adapt(model, method, **kw)
    assert all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert patched(model) == []
