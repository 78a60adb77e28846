"""The published presets of TENT, EATA/ETA, DeYO and BN-adapt against literal re-implementations of the published
constructions (whole model in train mode, the EATA moving average across resets, DeYO's parameter exclusions and
antialiased resize, norm.py's eps and running-buffer writes, the published optimizers)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmtts
from mmtts.adapters.deyo import patch_shuffle, resize
from mmtts.adapters.entropy_min import published_optimizer

C = 10


class Net(nn.Module):
    """Module names that meet every published exclusion: layer4, blocks.9/10, a module inside one named norm."""

    def __init__(self, seed=0, eps=1e-5):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, eps=eps)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, eps=eps), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4)) for _ in range(11))
        self.layer4 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, eps=eps), nn.ReLU())
        self.norm = nn.Sequential(nn.BatchNorm2d(4, eps=eps))
        self.drop = nn.Dropout(0.3)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, C)
        self.train()
        with torch.no_grad():  # non-trivial source statistics and affine parameters
            for _ in range(3):
                self(torch.randn(16, 3, 8, 8) * 2 + 1)
            for m in self.modules():
                if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
            self.fc.weight.mul_(8)  # confident enough for the entropy filters to select some samples
        self.eval()

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        for b in self.blocks:
            x = x + b(x)
        x = self.norm(self.layer4(x))
        return self.fc(self.ln(self.drop(x.mean((2, 3)))))


def batches(n=6, size=8, seed=1, side=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, side, side, generator=g) * 1.5 + 0.5 for _ in range(n)]


def entropy(logits):
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


# -- literal re-implementations of the published constructions --------------------------------------------


def published_configure(model, types):
    """The published configure_model: train() on everything, BatchNorm2d forced onto batch statistics."""
    model.train()
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
        if isinstance(m, types):
            m.requires_grad_(True)
    return model


def published_params(model, types, skips=()):
    out = []
    for name, m in model.named_modules():
        if name == "norm" or any(s in name for s in skips):
            continue
        if isinstance(m, types):
            out += [(f"{name}.{k}", p) for k, p in m.named_parameters() if k in ("weight", "bias")]
    return out


class RefTent:
    def __init__(self, model, opt, steps=1):
        self.model = published_configure(model, (nn.BatchNorm2d,))
        self.params = published_params(self.model, (nn.BatchNorm2d,))
        self.opt, self.steps = opt([p for _, p in self.params]), steps

    def __call__(self, x):
        for _ in range(self.steps):
            out = self.model(x)
            entropy(out).mean(0).backward()
            self.opt.step()
            self.opt.zero_grad()
        return out


class RefEta:
    def __init__(self, model, lr):
        self.model = published_configure(model, (nn.BatchNorm2d,))
        self.params = published_params(self.model, (nn.BatchNorm2d,))
        self.opt = torch.optim.SGD([p for _, p in self.params], lr, momentum=0.9)
        self.state = copy.deepcopy((self.model.state_dict(), self.opt.state_dict()))
        self.e0, self.d = 0.4 * math.log(C), 0.05
        self.probs = None

    def reset(self):  # parameters and optimizer only: the moving average stays
        self.model.load_state_dict(self.state[0])
        self.opt.load_state_dict(self.state[1])

    def __call__(self, x):
        out = self.model(x)
        ent = entropy(out)
        ids1 = torch.where(ent < self.e0)
        ent = ent[ids1]
        selected = out[ids1].softmax(1)
        if self.probs is not None:
            cos = F.cosine_similarity(self.probs.unsqueeze(0), selected, dim=1)
            ids2 = torch.where(cos.abs() < self.d)
            ent, selected = ent[ids2], selected[ids2]
        if selected.shape[0]:
            mean = selected.detach().mean(0)
            self.probs = mean if self.probs is None else 0.9 * self.probs + 0.1 * mean
        loss = ent.mul(1 / torch.exp(ent.detach() - self.e0)).mean(0)
        if ent.shape[0]:
            loss.backward()
            self.opt.step()
        self.opt.zero_grad()
        return out


def ref_shuffle(x, grid):
    """The published patch shuffle: torchvision Resize to a multiple of the grid, permute, Resize back."""
    from torchvision.transforms import Resize

    side = x.shape[-1]
    y = Resize(((side // grid) * grid, (side // grid) * grid))(x)
    b, c, h, w = y.shape
    y = y.reshape(b, c, grid, h // grid, grid, w // grid).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c,
                                                                                           h // grid, w // grid)
    perm = torch.argsort(torch.rand(y.shape[0], y.shape[1]), dim=-1)
    y = y[torch.arange(y.shape[0]).unsqueeze(-1), perm]
    y = y.reshape(b, grid, grid, c, h // grid, w // grid).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    return Resize((side, side))(y)


DEYO_TYPES = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
DEYO_SKIPS = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm.")


class RefDeyo:
    def __init__(self, model, lr, plpd_threshold=0.2):
        self.model = published_configure(model, DEYO_TYPES)
        self.params = published_params(self.model, DEYO_TYPES, DEYO_SKIPS)
        self.opt = torch.optim.SGD([p for _, p in self.params], lr, momentum=0.9)
        self.state = copy.deepcopy((self.model.state_dict(), self.opt.state_dict()))
        self.tau = plpd_threshold

    def reset(self):
        self.model.load_state_dict(self.state[0])
        self.opt.load_state_dict(self.state[1])

    def __call__(self, x):
        out = self.model(x)
        self.opt.zero_grad()
        ent = entropy(out)
        ids1 = torch.where(ent < 0.5 * math.log(C))
        ent = ent[ids1]
        if len(ent) == 0:
            return out
        with torch.no_grad():
            prime = self.model(ref_shuffle(x[ids1].detach(), 4))
        probs = out[ids1].softmax(1)
        cls = probs.argmax(1).reshape(-1, 1)
        plpd = (probs.gather(1, cls) - prime.softmax(1).gather(1, cls)).reshape(-1)
        ids2 = torch.where(plpd > self.tau)
        ent, plpd = ent[ids2], plpd[ids2]
        if len(ent) == 0:
            return out
        coeff = 1 / torch.exp(ent.detach() - 0.4 * math.log(C)) + 1 / torch.exp(-plpd.detach())
        ent.mul(coeff).mean(0).backward()
        self.opt.step()
        self.opt.zero_grad()
        return out


def run(adapter, xs, seed=0):
    torch.manual_seed(seed)  # dropout (and the published DeYO shuffle) draw from the global generator
    return [adapter(x) for x in xs]


def assert_same(outs, ref_outs, params, ref_params):
    assert len(outs) == len(ref_outs)
    # the kernels' reference and torch's BatchNorm round differently, and a few SGD steps with momentum amplify
    # that rounding (to ~3e-4 on logits of size ~10 with two threads); a different construction moves them by
    # far more (without Nesterov: 4.3; the default preset: 18)
    for a, b in zip(outs, ref_outs):
        assert torch.allclose(a, b.detach(), rtol=1e-3, atol=1e-3)
    assert [n for n, _ in params] == [n for n, _ in ref_params]
    for (n, p), (_, q) in zip(params, ref_params):
        assert torch.allclose(p, q, atol=1e-4), n


# -- train() modes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("opt", [{"optimizer": "adam", "lr": 1e-2}, {"optimizer": "sgd", "lr": 0.05,
                                                                      "nesterov": True}])
def test_published_tent_matches_the_published_construction_with_dropout_active(opt):
    xs = batches()
    ad = mmtts.adapt(Net(), "tent", published=True, **opt)
    if opt["optimizer"] == "adam":
        make = lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.9, 0.999))  # noqa: E731
    else:
        make = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True)  # noqa: E731
    ref = RefTent(Net(), make)
    assert_same(run(ad, xs), run(ref, xs), ad.params, ref.params)
    assert ad.model.drop.training and not ad.params[0][1].equal(Net().bn1.weight)
    torch.manual_seed(0)
    published_first = mmtts.adapt(Net(), "tent", published=True, **opt)(xs[0])
    default_first = mmtts.adapt(Net(), "tent", **opt)(xs[0])  # dropout off: another answer
    assert not torch.allclose(default_first, published_first, atol=1e-3)


def test_published_dropout_is_active_and_release_restores_eval_mode():
    x = batches(1)[0]
    model = Net()
    pub = mmtts.adapt(model, "tent", published=True, lr=0.0)
    torch.manual_seed(0)
    a, b = pub(x), pub(x)
    assert not torch.equal(a, b)  # a fresh dropout mask per call
    pub.release()
    assert not any(m.training for m in model.modules())
    default = mmtts.adapt(model, "tent", lr=0.0)
    assert torch.equal(default(x), default(x))


def test_published_returns_the_last_steps_prediction():
    xs = batches(3)
    make = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)  # noqa: E731
    ad = mmtts.adapt(Net(), "tent", published=True, optimizer="sgd", lr=0.05, steps=3)
    ref = RefTent(Net(), make, steps=3)
    assert_same(run(ad, xs), run(ref, xs), ad.params, ref.params)
    three, one = (mmtts.adapt(Net(), "tent", optimizer="sgd", lr=0.05, steps=k) for k in (3, 1))
    assert torch.equal(three(xs[0]), one(xs[0]))  # the default returns the first step's prediction


# -- EATA: the moving average across reset --------------------------------------------------------------


def cleared_margin(c):
    return mmtts.adapt(Net(), "eta").redundancy_margin(c)


def test_published_eta_carries_its_moving_average_across_reset():
    xs = batches(8)
    ad = mmtts.adapt(Net(), "eta", published=True, lr=0.05)
    ref = RefEta(Net(), lr=0.05)
    assert_same(run_with_reset(ad, xs, 4), run_with_reset(ref, xs, 4), ad.params, ref.params)
    assert torch.allclose(ad._ma_probs, ref.probs)
    assert ad.cost.counts["backward_samples"] > 0
    assert ad.redundancy_margin(C) == 0.05 and cleared_margin(C) > 0.05  # the published margin is fixed
    ad.reset()
    assert ad._ma_probs is not None
    cleared = mmtts.adapt(Net(), "eta", lr=0.05)  # the default clears it
    run(cleared, xs[:4])
    assert cleared._ma_probs is not None
    cleared.reset()
    assert cleared._ma_probs is None


def test_published_eata_estimates_its_fisher_in_train_mode_and_adapts_batchnorm2d_only():
    model = Net()
    modes = []
    model.drop.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    ad = mmtts.adapt(model, "eata", published=True, fisher_data=torch.randn(32, 3, 8, 8), fisher_batch_size=16,
                     lr=0.05)
    assert modes == [True, True]  # two Fisher batches of 16, dropout active
    assert all(n.startswith(("bn1", "layer1", "layer4", "norm")) for n, _ in ad.params)  # no GroupNorm/LayerNorm
    assert sorted(ad.fisher) == sorted(n for n, _ in ad.params)
    assert len(mmtts.adapt(Net(), "eata", fisher_data=torch.randn(32, 3, 8, 8)).params) > len(ad.params)


# -- DeYO: parameter exclusions, antialiased resize, the generator on reset ------------------------------


def test_published_deyo_skips_the_published_layers_and_matches_the_published_construction():
    xs = batches(6, side=10)  # 10 is no multiple of the grid: the antialiased resize runs
    src = Net()
    ad = mmtts.adapt(Net(), "deyo", published=True, lr=0.05)
    ref = RefDeyo(Net(), lr=0.05)
    names = [n for n, _ in ad.params]
    assert not any(s in n for n in names for s in DEYO_SKIPS)
    assert "blocks.8.1.weight" in names and "ln.weight" in names and "bn1.weight" in names
    outs, ref_outs = run(ad, xs), run(ref, xs)
    assert_same(outs, ref_outs, ad.params, ref.params)
    assert ad.cost.counts["backward_samples"] > 0
    state = dict(ad.model.named_parameters())
    for n in ("layer4.1.weight", "blocks.9.1.weight", "blocks.10.1.bias", "norm.0.weight"):  # untouched
        assert torch.equal(state[n], dict(src.named_parameters())[n]), n
    everything = mmtts.adapt(Net(), "deyo", lr=0.05)
    assert len(everything.params) == len(ad.params) + 4 * 2  # the default adapts the skipped layers too


def run_with_reset(adapter, xs, at):
    torch.manual_seed(0)
    outs = []
    for i, x in enumerate(xs):
        if i == at:
            adapter.reset()
        outs.append(adapter(x))
    return outs


def test_published_deyo_leaves_the_global_generator_alone_on_reset():
    xs = batches(4)
    ad = mmtts.adapt(Net(), "deyo", published=True, lr=0.05, plpd_threshold=-1.0)
    ref = RefDeyo(Net(), lr=0.05, plpd_threshold=-1.0)
    assert_same(run_with_reset(ad, xs, 2), run_with_reset(ref, xs, 2), ad.params, ref.params)
    assert ad.cost.counts["backward_samples"] > 0


def test_resize_is_torchvisions_antialiased_resize():
    from torchvision.transforms import Resize

    x = torch.rand(2, 3, 30, 30)
    assert torch.equal(resize(x, (28, 28)), Resize((28, 28))(x))
    assert torch.equal(resize(resize(x, (28, 28)), (30, 30)), Resize((30, 30))(Resize((28, 28))(x)))
    naive = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    assert (naive - resize(x, (28, 28))).abs().max() > 1e-3  # antialiasing changes the view
    assert resize(x, (30, 30)) is x


@pytest.mark.parametrize("side", [30, 32])
def test_patch_shuffle_with_the_global_generator_equals_the_published_shuffle(side):
    x = torch.rand(3, 3, side, side)
    torch.manual_seed(5)
    ours = patch_shuffle(x, 4)
    torch.manual_seed(5)
    assert torch.allclose(ours, ref_shuffle(x, 4), atol=1e-6)


# -- norm.py: eps and running buffers ----------------------------------------------------------------------


def test_published_bn_forces_eps_and_writes_running_statistics_as_norm_py():
    xs = batches(4)
    model, ref = Net(eps=1e-3), Net(eps=1e-3)
    source = copy.deepcopy(model.state_dict())
    for m in ref.modules():  # the published norm.py configuration
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.eps, m.momentum = 1e-5, 0.1
    ad = mmtts.adapt(model, "bn", published=True)
    assert all(m.eps == 1e-5 for _, m in ad.norm_modules)
    with torch.no_grad():
        for x in xs:
            assert torch.allclose(ad(x), ref(x), rtol=1e-4, atol=1e-4)
    written = ref.state_dict()
    for k, v in model.state_dict().items():
        assert torch.allclose(v.float(), written[k].float(), atol=1e-6), k
    assert int(model.bn1.num_batches_tracked) == int(source["bn1.num_batches_tracked"]) + 4
    ad.reset()
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    ad.release()
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    default = mmtts.adapt(model, "bn")  # keeps the model's eps and never writes the buffers
    out = default(xs[0])
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    assert not torch.allclose(out, mmtts.adapt(Net(eps=1e-3), "bn", published=True)(xs[0]), atol=1e-6)


def test_published_bn_needs_batchnorm2d():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).eval()
    with pytest.raises(mmtts.MmttsError, match="BatchNorm2d layers only.*published=False"):
        mmtts.adapt(model, "bn", published=True)
    assert not model.training


# -- optimizer ----------------------------------------------------------------------------------------


def test_published_optimizer_settings():
    assert published_optimizer("tent", 128) == {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0}
    assert published_optimizer("tent", 128, optimizer="sgd")["nesterov"] is True
    assert published_optimizer("eata", 16)["lr"] == published_optimizer("eta", 64)["lr"] == 2.5e-4
    assert published_optimizer("deyo", 64)["lr"] == 2.5e-4
    assert published_optimizer("deyo", 16)["lr"] == pytest.approx(2.5e-4 / 64 * 16 * 2)
    assert published_optimizer("deyo", 1)["lr"] == pytest.approx(2.5e-4 / 64 * 4)
    assert published_optimizer("deyo", 64, backbone="vit")["lr"] == pytest.approx(1e-3)
    ad = mmtts.adapt(Net(), "deyo", published=True, **published_optimizer("deyo", 16))
    assert ad.optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-4 / 2)
    with pytest.raises(mmtts.MmttsError, match="unknown method 'sar'"):
        published_optimizer("sar", 64)
    with pytest.raises(mmtts.MmttsError, match="uses SGD only"):
        published_optimizer("deyo", 64, optimizer="adam")


def test_bad_published_and_nesterov_settings_are_named():
    with pytest.raises(mmtts.MmttsError, match="sar has no published preset"):
        mmtts.adapt(Net(), "sar", published=True)
    with pytest.raises(mmtts.MmttsError, match="nesterov=True needs optimizer='sgd'"):
        mmtts.adapt(Net(), "tent", nesterov=True)
    with pytest.raises(mmtts.MmttsError, match="published='yes' must be True or False"):
        mmtts.adapt(Net(), "eta", published="yes")
    gn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                       nn.Linear(4, 3)).eval()
    with pytest.raises(mmtts.MmttsError, match="published tent adapts BatchNorm2d layers only.*published=False"):
        mmtts.adapt(gn, "tent", published=True)
    assert not gn.training and all(p.requires_grad for p in gn.parameters())
