"""toy-gmm: search on an analytic 2-D Gaussian-mixture diffusion with closed-form optima.

The search verifier is a quadratic reward around a point between modes; the
held-out verifier is the data log-density, which falls if a search drifts off
the data distribution. With the exact sampler, best-of-N's expected reward is
known in closed form (order statistics), so the plot carries the analytic
curve beside the measured one, and the supremum of the reward (0).

``model=learned`` swaps the closed-form denoiser for a small MLP trained by
the project and cached (DDIM sampler): the same benchmark code on a learned
model, as it would run on a real checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.errors import MmttsError
from ..core.progress import progress_bar
from ..core.registry import STRATEGIES, TASKS
from ..core.strategy import run_strategy
from ..core.threads import one_thread
from ..modalities.toy_gmm import DEFAULT_MIXTURE, DEFAULT_TARGET, GMMDiffusion, MixtureLogDensity, QuadraticReward
from .base import Task


class MLPDenoiser(nn.Module):
    """x0-prediction network for the mixture: (x_t, abar) -> x0_hat.

    Args:
        dim: dimension of the data.
        hidden: width of the hidden layers.
    """

    def __init__(self, dim: int = 2, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x, abar):
        a = abar.reshape(-1, 1).to(x.dtype)
        inp = torch.cat([x, a.sqrt(), (1 - a).sqrt()], 1)
        # predict the residual from the linear estimate sqrt(abar) x, which is exact for a centred Gaussian
        return a.sqrt() * x + self.net(inp.float()).to(x.dtype)


DENOISER_CONFIG = {"arch": "mlp-x0", "hidden": 128, "steps": 3000, "batch": 512, "lr": 2e-3, "seed": 0,
                   "mixture": [DEFAULT_MIXTURE.weights, DEFAULT_MIXTURE.means, DEFAULT_MIXTURE.stds]}


DENOISER_QUICK = {**DENOISER_CONFIG, "steps": 400}


@one_thread()
def train_denoiser(config: dict) -> dict[str, torch.Tensor]:
    """Denoising regression on fresh mixture samples at random noise levels (minimiser: E[x0 | x_t])."""
    g = torch.Generator().manual_seed(config["seed"])
    torch.manual_seed(config["seed"])
    model = MLPDenoiser(DEFAULT_MIXTURE.dim, config["hidden"])
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config["steps"])
    with progress_bar(config["steps"], "training toy-gmm denoiser") as advance:
        for i in range(config["steps"]):
            x0 = DEFAULT_MIXTURE.sample(config["batch"], g).float()
            u = torch.rand(config["batch"], generator=g)
            abar = torch.cos(0.5 * math.pi * u) ** 2
            xt = abar.sqrt()[:, None] * x0 + (1 - abar).sqrt()[:, None] * torch.randn(x0.shape, generator=g)
            loss = ((model(xt, abar) - x0) ** 2).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if i % 100 == 99:
                advance(100, loss=loss.item())
    return model.state_dict()


@TASKS.register("toy-gmm")
class ToyGMM(Task):
    """2-D Gaussian-mixture diffusion with an exact score: strategies against closed-form optima.

    Args:
        cache: where trained weights are kept; a default :class:`ModelCache` when None.
        quick: run a reduced version for a fast check.
        **options: ``model`` (``"exact"`` denoiser or a ``"learned"`` one), ``stages``
            (denoising steps) and ``lmbda`` (the particle filter's potential weight).
    """

    description = "2-D Gaussian-mixture diffusion with an exact score: strategies against closed-form optima"
    methods = ("best-of-n", "particle-filter", "beam")
    baseline = "best-of-n"
    primary_metric = "reward"
    default_budgets = (20, 40, 80, 160, 320, 640, 1280)
    quick_budgets = (20, 80, 320)
    option_defaults = {"model": "exact", "stages": 20, "lmbda": 10.0}

    def __init__(self, cache=None, quick: bool = False, **options):
        super().__init__(cache, quick, **options)
        if self.options["model"] not in ("exact", "learned"):
            raise MmttsError(f"toy-gmm option model={self.options['model']!r}; choose exact or learned")
        self.mixture = DEFAULT_MIXTURE
        self.reward = QuadraticReward(DEFAULT_TARGET, width=1.0, name="reward")
        self._process = None

    def prepare(self) -> list[str]:
        if self.options["model"] == "learned":
            self._load_denoiser()
            return ["toy-gmm-denoiser"]
        return []

    def _load_denoiser(self) -> MLPDenoiser:
        cfg = DENOISER_QUICK if self.quick else DENOISER_CONFIG
        state = self.cache.load_or_train("toy-gmm-denoiser", cfg, lambda: train_denoiser(cfg))
        model = MLPDenoiser(self.mixture.dim, cfg["hidden"])
        model.load_state_dict(state)
        return model.eval()

    @property
    def process(self) -> GMMDiffusion:
        if self._process is None:
            if self.options["model"] == "learned":
                self._process = GMMDiffusion(self.mixture, self.options["stages"], sampler="ddim",
                                             denoiser=self._load_denoiser())
            else:
                self._process = GMMDiffusion(self.mixture, self.options["stages"], sampler="exact")
        return self._process

    def strategy_settings(self, method: str, budget: int) -> dict:
        n = budget // self.process.nfe_per_candidate()
        if method == "particle-filter":
            return {"lmbda": self.options["lmbda"], "potential": "diff"}
        if method == "beam":
            return {"beams": max(1, n // 4)}
        return {}

    def detail(self, method: str, setting: str, budget: int | None) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.strategy_settings(method, budget).items())

    def run(self, method: str, setting: str, budget: int | None, seed: int) -> dict[str, float]:
        self.check_method(method)
        self.check_setting(setting)
        strategy = STRATEGIES.create(method, **self.strategy_settings(method, budget))
        res = run_strategy(strategy, self.process, self.reward, budget, seed=seed,
                           heldout={"log_density": MixtureLogDensity(self.mixture)})
        return {"reward": res.best_score, "log_density": float(res.heldout["log_density"][0]),
                "nfe": float(res.budget["nfe"]), "verifier_calls": float(res.budget["verifier_calls"])}

    def references(self, budgets: list[int]) -> dict[str, list[float]]:
        refs = {"optimum (sup reward)": [0.0] * len(budgets)}
        if self.options["model"] == "exact":
            per = self.process.nfe_per_candidate()
            refs["best-of-N, analytic E[max]"] = [
                self.reward.expected_best_of(self.mixture, max(b // per, 1)) for b in budgets]
        return refs

    def describe(self) -> dict:
        return {**super().describe(), "mixture": {"weights": self.mixture.weights, "means": self.mixture.means,
                                                  "stds": self.mixture.stds},
                "reward": {"center": DEFAULT_TARGET, "width": 1.0}, "abar": "cosine",
                "num_stages": self.options["stages"]}
