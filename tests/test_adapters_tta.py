"""Classic test-time adaptation methods: reductions between methods, exact reset, bad input."""

import math

import pytest
import torch
from torch import nn

import mmtts
from mmtts.adapters.deyo import patch_shuffle
from mmtts.adapters.eata import redundancy_margin

GRADIENT = ["tent", "eta", "deyo", "sar"]
ALL = ["source", "bn", "alpha-bn", "tent", "eta", "eata", "deyo", "sar"]


def net(norm="bn", classes=5, seed=0):
    layer = {"bn": nn.BatchNorm2d, "gn": lambda c: nn.GroupNorm(2, c)}[norm]
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), layer(4), nn.ReLU(), nn.Conv2d(4, 6, 3), layer(6), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, classes))
    m.train()
    with torch.no_grad():  # non-trivial source statistics and affine parameters
        for _ in range(5):
            m(torch.randn(16, 3, 8, 8) * 2 + 1)
        for mod in m.modules():
            if isinstance(mod, (nn.BatchNorm2d, nn.GroupNorm)):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
    return m.eval()


def make(method, model, **kw):
    if method == "eata":
        kw.setdefault("fisher_data", torch.randn(32, 3, 8, 8))
    return mmtts.adapt(model, method, **kw)


def batches(n=10, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 8, 8, generator=g) * 1.5 + 0.5 for _ in range(n)]


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- reductions between methods -------------------------------------------------------------------------


def test_bn_adapt_equals_pytorch_batchnorm_forward_in_training_mode():
    ref = net().train()
    x = batches(1)[0]
    with torch.no_grad():
        expected = ref(x)
    model = net()
    before = state(model)
    assert torch.allclose(mmtts.adapt(model, "bn")(x), expected, atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running statistics are read, never written


def test_alpha_bn_interpolates_between_source_and_bn():
    x = batches(1)[0]
    with torch.no_grad():
        src = net()(x)
    bn = mmtts.adapt(net(), "bn")(x)
    for exact in (False, True):
        assert torch.allclose(mmtts.adapt(net(), "alpha-bn", alpha=1.0, exact_variance=exact)(x), src, atol=1e-5)
        assert torch.allclose(mmtts.adapt(net(), "alpha-bn", alpha=0.0, exact_variance=exact)(x), bn, atol=1e-6)
    mid = mmtts.adapt(net(), "alpha-bn", alpha=0.5)(x)
    assert not torch.allclose(mid, src, atol=1e-3) and not torch.allclose(mid, bn, atol=1e-3)


def test_tent_with_zero_learning_rate_equals_bn_adapt():
    tent, bn = mmtts.adapt(net(), "tent", lr=0.0), mmtts.adapt(net(), "bn")
    for x in batches(5):
        assert torch.allclose(tent(x), bn(x), atol=1e-5)


def _run_pair(a, b, steps=6):
    for x in batches(steps):
        assert torch.allclose(a(x), b(x), atol=1e-6)
    for (n, p), (_, q) in zip(a.params, b.params):
        assert torch.allclose(p, q, atol=1e-6), n


@pytest.mark.parametrize("opt", [{"optimizer": "adam", "lr": 1e-2}, {"optimizer": "sgd", "lr": 0.05}])
def test_eata_with_filters_weights_and_fisher_off_equals_tent(opt):
    tent = mmtts.adapt(net(), "tent", **opt)
    eata = mmtts.adapt(net(), "eata", filter_entropy=False, filter_redundancy=False, reweight=False,
                       fisher_alpha=0.0, **opt)
    _run_pair(tent, eata)
    assert not torch.allclose(tent.params[0][1], net()[1].weight)  # and they did adapt


def test_deyo_with_filters_and_weights_off_equals_tent():
    opt = {"optimizer": "sgd", "lr": 0.05}
    tent = mmtts.adapt(net(), "tent", **opt)
    deyo = mmtts.adapt(net(), "deyo", filter_entropy=False, filter_plpd=False, reweight_entropy=False,
                       reweight_plpd=False, **opt)
    assert [n for n, _ in deyo.params] == [n for n, _ in tent.params]
    _run_pair(tent, deyo)
    assert deyo.cost.counts["forward_samples"] == deyo.cost.counts["samples"]  # no extra pass on x'


def test_sar_without_its_sharpness_step_and_filters_equals_tent_with_sgd():
    opt = {"optimizer": "sgd", "lr": 0.05}
    tent = mmtts.adapt(net(), "tent", **opt)
    sar = mmtts.adapt(net(), "sar", rho=0.0, entropy_margin=1.01, reset_margin=0.0, **opt)
    _run_pair(tent, sar)


def test_sar_recovers_the_source_model_when_its_loss_collapses():
    model = net()
    before = state(model)
    sar = mmtts.adapt(model, "sar", lr=0.05, entropy_margin=1.01, reset_margin=1.0)  # any loss counts as collapse
    sar(batches(1)[0])
    assert sar.recoveries == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- reset, episodic, determinism ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL)
def test_reset_restores_every_parameter_and_buffer_bit_for_bit_after_ten_steps(method):
    model = net()
    before = state(model)
    # settings under which every gradient method updates on these random batches
    kw = {"tent": {"lr": 0.05}, "sar": {"lr": 0.05, "entropy_margin": 1.01},
          "deyo": {"lr": 0.05, "filter_entropy": False, "plpd_threshold": -1.0},
          "eta": {"lr": 0.05, "filter_entropy": False}, "eata": {"lr": 0.05, "filter_entropy": False}}.get(method, {})
    ad = make(method, model, **kw)
    first = [ad(x) for x in batches(10)]
    if method in GRADIENT:
        assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    ad.reset()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    again = [ad(x) for x in batches(10)]  # and the run repeats exactly
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("method", ["alpha-bn", "tent", "eta", "eata", "deyo", "sar"])
def test_episodic_mode_does_not_leak_between_batches(method):
    ad = make(method, net(), episodic=True, **({} if method == "alpha-bn" else {"lr": 0.05}))
    x, y = batches(2)
    first = ad(x)
    for _ in range(3):
        ad(y)
    assert torch.equal(ad(x), first)


def test_release_returns_the_plain_model():
    model = net()
    x = batches(1)[0]
    with torch.no_grad():
        expected = model(x)
    mmtts.adapt(model, "alpha-bn", alpha=0.5).release()
    with torch.no_grad():
        assert torch.equal(model(x), expected)


# -- thresholds derived from the number of classes ---------------------------------------------------


def test_redundancy_margin_scales_with_the_number_of_classes():
    assert redundancy_margin(1000) == pytest.approx(0.05)
    for c in (10, 100, 1000):
        # a confident prediction against a uniform moving average passes the filter for any C
        assert 1 / math.sqrt(c) < redundancy_margin(c)


def test_eata_entropy_filter_uses_a_fraction_of_ln_c():
    model = net(classes=10)
    with torch.no_grad():
        model[-1].weight.zero_()  # uniform predictions: entropy ln C, above 0.4 ln C
    ad = mmtts.adapt(model, "eta", lr=0.1)
    before = state(model)
    for x in batches(3):
        ad(x)
    assert ad.cost.counts["backward_samples"] == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_eata_selects_and_keeps_adapting_for_small_c():
    model = net(classes=10)
    with torch.no_grad():
        model[-1].weight.mul_(40)  # confident predictions
    ad = mmtts.adapt(model, "eta", lr=0.01)
    for x in batches(6, size=16):
        ad(x)
    assert 0 < ad.cost.per_sample("backward_samples") <= 1
    assert ad.cost.counts["backward_samples"] > 16  # not only the first batch: redundancy margin fits C = 10


def test_eata_fisher_penalty_needs_clean_data_and_anchors_the_parameters():
    with pytest.raises(mmtts.MmttsError, match="fisher_data=.*'eta'"):
        mmtts.adapt(net(), "eata")
    src = net()[1].weight.detach().clone()
    drift = {}
    for alpha in (0.0, 500.0):
        ad = make("eata", net(), fisher_alpha=alpha, filter_entropy=False, filter_redundancy=False, lr=1.0,
                  momentum=0.0)
        if alpha:
            assert all((f >= 0).all() and f.sum() > 0 for f, _ in ad.fisher.values())
        for x in batches(5):
            ad(x)
        drift[alpha] = float((ad.params[0][1].detach() - src).abs().sum())
    assert 0 < drift[500.0] < 0.9 * drift[0.0]


def test_patch_shuffle_permutes_whole_patches_once_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    y = patch_shuffle(x, 4, g)
    assert not torch.equal(x, y)
    for i in range(2):
        src = {tuple(x[i, :, r:r + 2, c:c + 2].flatten().tolist()) for r in range(0, 8, 2) for c in range(0, 8, 2)}
        out = {tuple(y[i, :, r:r + 2, c:c + 2].flatten().tolist()) for r in range(0, 8, 2) for c in range(0, 8, 2)}
        assert src == out
    assert patch_shuffle(torch.rand(2, 3, 9, 10), 4, g).shape == (2, 3, 9, 10)


def test_deyo_plpd_filter_uses_the_shuffled_view():
    ad = mmtts.adapt(net(), "deyo", lr=0.05, filter_entropy=False, plpd_threshold=-1.0)
    ad(batches(1)[0])
    assert ad.cost.counts["forward_samples"] == 16  # 8 samples + 8 shuffled views
    strict = mmtts.adapt(net(), "deyo", lr=0.05, filter_entropy=False, plpd_threshold=1.0)
    before = state(strict.model)
    strict(batches(1)[0])
    assert strict.cost.counts["backward_samples"] == 0
    assert all(torch.equal(v, before[k]) for k, v in strict.model.state_dict().items())


# -- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL)
def test_wrong_number_of_dimensions_is_named(method):
    ad = make(method, net())
    with pytest.raises(mmtts.MmttsError, match=r"\(N, C, H, W\).*got shape \(3, 8, 8\).*unsqueeze\(0\)"):
        ad(torch.randn(3, 8, 8))


@pytest.mark.parametrize("method", ALL)
def test_nan_input_raises_and_leaves_the_model_unchanged(method):
    ad = make(method, net(), **({"lr": 0.05} if method in GRADIENT else {}))
    for x in batches(3):
        ad(x)
    before = state(ad.model)
    opt = str(ad.optimizer.state_dict()) if ad.optimizer else None
    bad = batches(1)[0]
    bad[3, 0, 2, 2] = float("nan")
    with pytest.raises(mmtts.MmttsError, match="NaN or infinite values in 1 of 8.*unchanged"):
        ad(bad)
    assert all(torch.equal(v, before[k]) for k, v in ad.model.state_dict().items())
    assert opt == (str(ad.optimizer.state_dict()) if ad.optimizer else None)


@pytest.mark.parametrize("method", ["bn", "alpha-bn", "tent", "eta", "deyo", "sar"])
def test_a_model_without_norm_layers_is_refused_with_a_way_out(method):
    with pytest.raises(mmtts.MmttsError, match="nothing to adapt.*'source'"):
        mmtts.adapt(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), method)


def test_batch_size_one():
    x = batches(1)[0][:1]
    for method in ("bn", "tent", "eta", "deyo", "sar"):
        with pytest.raises(mmtts.MmttsError, match="batch of 1"):
            mmtts.adapt(net(), method)(x)
    assert mmtts.adapt(net(), "alpha-bn")(x).shape == (1, 5)  # source statistics regularize one sample
    # a window pools the last samples: after K single samples it equals BN on those K
    ad = mmtts.adapt(net(), "bn", window=4)
    stream = batches(1)[0][:6]
    outs = [ad(stream[i:i + 1]) for i in range(6)]
    full = mmtts.adapt(net(), "bn")(stream[2:6])
    assert torch.allclose(outs[-1], full[-1:], atol=1e-5)
    ad.reset()
    assert torch.equal(ad(stream[:1]), outs[0])
    # GroupNorm models adapt sample by sample
    for method in GRADIENT:
        kw = {"tent": {}, "sar": {"entropy_margin": 1.01}}.get(method, {"filter_entropy": False})
        ad = mmtts.adapt(net("gn"), method, lr=0.05, **kw)
        for i in range(3):
            assert ad(stream[i:i + 1]).shape == (1, 5)
    assert ad.cost.counts["samples"] == 3


def test_bad_settings_are_named():
    with pytest.raises(mmtts.MmttsError, match="alpha=1.5.*weight on the source"):
        mmtts.adapt(net(), "alpha-bn", alpha=1.5)
    with pytest.raises(mmtts.MmttsError, match="optimizer='rmsprop'"):
        mmtts.adapt(net(), "tent", optimizer="rmsprop")
    with pytest.raises(mmtts.MmttsError, match="affine"):
        mmtts.adapt(nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2, affine=False)), "tent")
