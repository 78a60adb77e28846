"""vla-mujoco: RoboMonkey-style action sampling and verification on MuJoCo's Reacher-v5, offline.

The pieces mirror a VLA deployment at small scale:

- a scripted expert (inverse kinematics to the target, then joint PD
  control) stands in for the demonstrator and defines the "correct" action
  of every state, against which action error is measured;
- a stochastic behaviour-cloned policy (Gaussian MLP head) is trained on a
  limited set of noisy demonstrations, so it errs as a real VLA does when it
  samples at temperature 1;
- an action verifier is trained on the same demonstrations only, by the
  synthetic recipe (perturbed actions ranked by their error to the
  demonstrated action, Bradley-Terry loss with margin); it reads the state
  in the frame of the arm's first link, which makes it invariant to turning
  the scene about the base;
- both are cached; the wrapper then acts in the environment through the
  same ``GymPolicy`` a user would use.

Settings: ``in-distribution`` draws targets and dynamics as the
demonstrations did (targets 6 to 19 cm from the base). Two shifts take the
policy outside them: in ``ood-dynamics`` the actuators deliver ``ood_gear``
of their torque (a weaker or loaded arm), so the policy visits states the
demonstrations never showed; in ``ood-targets`` the targets lie 2 to 6 cm
from the base, nearer than any demonstrated target, where the arm must fold
in a way neither the policy nor the verifier has seen.

Methods at a budget of k samples: ``policy`` is the single-sample base
policy (the baseline, the same at every budget); ``robomonkey`` draws
N = min(k, ``samples``) policy samples and K = k Gaussian candidates;
``sample-verify`` verifies k policy samples without the Gaussian step.
Success is a final fingertip-to-target distance under ``success_radius``
metres. ``ms_per_step`` is the median time the wrapper takes per control
step (the environment excluded): the median, because on a shared machine
the mean is dominated by the moments another process holds the core. The
references drawn beside the action error are power-law fits e = a * k^b of
``robomonkey``'s action error in each setting.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..core.errors import MmttsError
from ..core.progress import progress_bar
from ..core.registry import TASKS
from ..core.rng import derive_seed
from ..core.threads import one_thread
from ..modalities.vla import (ActionSpace, ActionVerifier, GaussianPolicy, MLPActionScorer, QuadraticFeatures,
                              RoboMonkeyPolicy, train_action_verifier)
from ..modalities.vla.gym_env import GymPolicy, run_episode
from .base import Task

ENV_ID = "Reacher-v5"
LINKS = (0.1, 0.11)
STATE_DIM, ACTION_DIM = 10, 2
SETTINGS = ("in-distribution", "ood-dynamics", "ood-targets")
DEMO_RADIUS, OOD_RADIUS = (0.06, 0.19), (0.02, 0.06)


def require_gymnasium():
    try:
        import gymnasium
        import mujoco  # noqa: F401
    except ImportError as e:
        raise MmttsError(f"vla-mujoco needs gymnasium and mujoco ({e.name} is missing): "
                         "pip install 'mmtts[robotics]'") from None
    return gymnasium


def expert_action(obs: np.ndarray, kp: float = 2.0, kd: float = 0.1) -> np.ndarray:
    """The scripted expert for Reacher observations (..., 10): IK to the target, then joint PD, clipped to [-1, 1].

    Of the two elbow solutions it steers to the one nearer the current
    joint angles, so its action is a function of the observation alone.
    """
    obs = np.asarray(obs, dtype=np.float64)
    q = np.arctan2(obs[..., 2:4], obs[..., 0:2])
    qd, target = obs[..., 6:8], obs[..., 4:6]
    l1, l2 = LINKS
    c = np.clip(((target ** 2).sum(-1) - l1 ** 2 - l2 ** 2) / (2 * l1 * l2), -1.0, 1.0)
    s = np.sqrt(1.0 - c * c)
    errs = []
    for sign in (1.0, -1.0):
        elbow = np.arctan2(sign * s, c)
        shoulder = np.arctan2(target[..., 1], target[..., 0]) - np.arctan2(l2 * np.sin(elbow), l1 + l2 * np.cos(elbow))
        errs.append((np.stack([shoulder, elbow], -1) - q + np.pi) % (2 * np.pi) - np.pi)
    near = (np.abs(errs[0]).sum(-1) <= np.abs(errs[1]).sum(-1))[..., None]
    return np.clip(kp * np.where(near, errs[0], errs[1]) - kd * qd, -1.0, 1.0)


def make_env(gear: float = 1.0, radius: tuple[float, float] = DEMO_RADIUS):
    """Reacher-v5 whose ``reset(seed)`` places the target from the seed and scales the actuator gear."""
    gym = require_gymnasium()

    class PlacedTarget(gym.Wrapper):
        """Targets at a seeded radius in ``radius`` and any angle; actuators at ``gear`` of their strength.

        Args:
            env: the Reacher environment to wrap.
        """

        def __init__(self, env):
            super().__init__(env)
            model = env.unwrapped.model
            model.actuator_gear[:, 0] = model.actuator_gear[:, 0] * gear

        def reset(self, *, seed=None, options=None):
            obs, info = self.env.reset(seed=seed, options=options)
            rng = np.random.default_rng(seed)
            r, a = rng.uniform(*radius), rng.uniform(-math.pi, math.pi)
            u = self.env.unwrapped
            qpos, qvel = u.data.qpos.copy(), u.data.qvel.copy()
            qpos[2:4] = (r * math.cos(a), r * math.sin(a))
            u.set_state(qpos, qvel)
            return u._get_obs(), info

    return PlacedTarget(gym.make(ENV_ID))


def fingertip_distance(obs: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(obs)[8:10]))


def collect_demonstrations(config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """States and executed actions of noisy expert episodes (the demonstrator's noise is part of the data)."""
    env = make_env()
    rng = np.random.default_rng(config["seed"])
    states, actions = [], []
    for e in range(config["episodes"]):
        obs, _ = env.reset(seed=derive_seed(config["seed"], e) % 2 ** 31)
        done = False
        while not done:
            act = np.clip(expert_action(obs) + config["noise"] * rng.standard_normal(ACTION_DIM), -1.0, 1.0)
            states.append(obs)
            actions.append(act)
            obs, _, terminated, truncated, _ = env.step(act.astype(np.float32))
            done = terminated or truncated
    env.close()
    return torch.tensor(np.array(states), dtype=torch.float32), torch.tensor(np.array(actions), dtype=torch.float32)


class GaussianMLP(nn.Module):
    """state -> (mean, log_std) of a diagonal Gaussian over actions, with the input standardisation as buffers.

    Args:
        state_dim: size of the state.
        action_dim: size of the action.
        hidden: width of the hidden layers.
    """

    def __init__(self, state_dim: int = STATE_DIM, action_dim: int = ACTION_DIM, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2 * action_dim))
        self.register_buffer("state_mean", torch.zeros(state_dim))
        self.register_buffer("state_std", torch.ones(state_dim))

    def forward(self, state: torch.Tensor):
        out = self.net((state - self.state_mean) / self.state_std)
        mean, log_std = out.chunk(2, dim=-1)
        return mean, log_std.clamp(-5.0, 1.0)


def train_policy(config: dict) -> dict[str, torch.Tensor]:
    """Behaviour cloning by Gaussian negative log-likelihood on the demonstrations."""
    with one_thread():
        return _train_policy(config)


def _train_policy(config: dict) -> dict[str, torch.Tensor]:
    states, actions = collect_demonstrations(config["demos"])
    torch.manual_seed(config["seed"])
    g = torch.Generator().manual_seed(config["seed"])
    model = GaussianMLP(hidden=config["hidden"])
    model.state_mean.copy_(states.mean(0))
    model.state_std.copy_(states.std(0).clamp(min=1e-6))
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config["steps"])
    with progress_bar(config["steps"], "training vla-mujoco policy") as advance:
        for i in range(config["steps"]):
            idx = torch.randint(0, states.shape[0], (config["batch"],), generator=g)
            mean, log_std = model(states[idx])
            loss = (0.5 * ((actions[idx] - mean) / log_std.exp()) ** 2 + log_std).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if i % 50 == 49:
                advance(50, nll=loss.item())
    return model.state_dict()


def arm_frame_features() -> QuadraticFeatures:
    """Reacher observations seen from the first link: invariant to turning the whole scene about the base.

    Features: cos and sin of the elbow angle, the two joint velocities, and
    the target position and the fingertip-minus-target vector rotated by minus
    the shoulder angle (``cos q1 * x + sin q1 * y``, ``-sin q1 * x + cos q1 * y``).
    The shoulder angle itself is left out: the correct torque does not depend
    on where the arm points, only on where the target is relative to it.
    """
    cos1, cos2, sin1, sin2, tx, ty, qd1, qd2, dx, dy = range(STATE_DIM)
    linear, quadratic = torch.zeros(8, STATE_DIM), torch.zeros(8, STATE_DIM, STATE_DIM)
    for f, i in enumerate((cos2, sin2, qd1, qd2)):
        linear[f, i] = 1.0
    for f, (x, y) in zip((4, 6), ((tx, ty), (dx, dy))):
        quadratic[f, cos1, x], quadratic[f, sin1, y] = 1.0, 1.0  # along the first link
        quadratic[f + 1, sin1, x], quadratic[f + 1, cos1, y] = -1.0, 1.0  # across it
    return QuadraticFeatures(linear, quadratic)


FEATURES = {"raw": lambda: None, "arm-frame": arm_frame_features}


def make_scorer(config: dict) -> MLPActionScorer:
    """The verifier's scorer for a config (its state features and width)."""
    return MLPActionScorer(STATE_DIM, ACTION_DIM, hidden=config["hidden"],
                           features=FEATURES[config.get("features", "raw")]())


def train_verifier(config: dict) -> dict[str, torch.Tensor]:
    """The synthetic-pair Bradley-Terry recipe on the demonstrations the policy saw."""
    with one_thread():
        return _train_verifier(config)


def _train_verifier(config: dict) -> dict[str, torch.Tensor]:
    states, actions = collect_demonstrations(config["demos"])
    torch.manual_seed(config["seed"])
    scorer = make_scorer(config)
    scorer.set_normalisation(states)
    train_action_verifier(scorer, {"observation.state": states}, actions[:, None], steps=config["steps"],
                          batch_size=config["batch"], lr=config["lr"], alpha=config["alpha"], seed=config["seed"],
                          space=ActionSpace.box(-1.0, 1.0, dim=ACTION_DIM), min_scale=config["min_scale"],
                          max_scale=config["max_scale"], description="training vla-mujoco verifier")
    return scorer.state_dict()


DEMOS = {"env": ENV_ID, "expert": "ik-pd kp=2 kd=0.1", "episodes": 100, "noise": 0.3, "seed": 0}
POLICY_CONFIG = {"demos": DEMOS, "arch": "gaussian-mlp", "hidden": 128, "steps": 3000, "batch": 256, "lr": 1e-3,
                 "seed": 0}
VERIFIER_CONFIG = {"demos": DEMOS, "arch": "mlp-scorer", "features": "arm-frame", "hidden": 128, "steps": 3000,
                   "batch": 1024, "lr": 3e-3, "alpha": 1.0, "min_scale": 0.02, "max_scale": 1.0, "seed": 0}
QUICK_DEMOS = {**DEMOS, "episodes": 20}
QUICK_POLICY_CONFIG = {**POLICY_CONFIG, "demos": QUICK_DEMOS, "hidden": 64, "steps": 300}
QUICK_VERIFIER_CONFIG = {**VERIFIER_CONFIG, "demos": QUICK_DEMOS, "hidden": 64, "steps": 300, "batch": 256}


def power_law_fit(budgets, errors) -> tuple[float, float]:
    """Least-squares fit of log e = log a + b log k; returns (a, b)."""
    b, log_a = np.polyfit(np.log(np.asarray(budgets, dtype=np.float64)), np.log(np.asarray(errors)), 1)
    return float(math.exp(log_a)), float(b)


@TASKS.register("vla-mujoco")
class VLAMujoco(Task):
    """RoboMonkey action sampling and verification on MuJoCo Reacher: BC policy, learned verifier.

    Args:
        cache: where trained weights are kept; a default :class:`ModelCache` when None.
        quick: run a reduced version for a fast check.
        **options: ``episodes`` (evaluation episodes; 3 when quick), ``samples`` (actions
            sampled per step), ``success_radius`` (final distance counted as success) and
            ``ood_gear`` (actuator strength in the ``ood-dynamics`` setting).
    """

    description = "RoboMonkey action sampling and verification on MuJoCo Reacher: BC policy, learned verifier"
    methods = ("policy", "robomonkey", "sample-verify")
    baseline = "policy"
    primary_metric = "action_error"
    higher_is_better = False
    budget_unit = "samples"
    settings = SETTINGS
    quick_settings = ("in-distribution",)
    default_budgets = (1, 2, 4, 8, 16, 32)
    quick_budgets = (1, 8)
    option_defaults = {"episodes": 100, "samples": 8, "success_radius": 0.01, "ood_gear": 0.5}

    def __init__(self, cache=None, quick: bool = False, **options):
        super().__init__(cache, quick, **options)
        if self.options["episodes"] < 1 or self.options["samples"] < 1:
            raise MmttsError(f"vla-mujoco options episodes={self.options['episodes']} and "
                             f"samples={self.options['samples']} must be at least 1")
        if not 0 < self.options["ood_gear"]:
            raise MmttsError(f"ood_gear={self.options['ood_gear']} must be a positive torque scale")
        self.episodes = 3 if quick else self.options["episodes"]
        self.policy_config = QUICK_POLICY_CONFIG if quick else POLICY_CONFIG
        self.verifier_config = QUICK_VERIFIER_CONFIG if quick else VERIFIER_CONFIG
        self._models = None
        self._baseline: dict = {}
        self._errors: dict = {}

    def prepare(self) -> list[str]:
        self._load()
        return ["vla-mujoco-policy", "vla-mujoco-verifier"]

    def _load(self):
        if self._models is None:
            require_gymnasium()
            pc, vc = self.policy_config, self.verifier_config
            net = GaussianMLP(hidden=pc["hidden"])
            net.load_state_dict(self.cache.load_or_train("vla-mujoco-policy", pc, lambda: train_policy(pc)))
            scorer = make_scorer(vc)
            scorer.load_state_dict(self.cache.load_or_train("vla-mujoco-verifier", vc, lambda: train_verifier(vc)))
            self._models = (GaussianPolicy(net.eval(), STATE_DIM), ActionVerifier(scorer.eval().folded()))
        return self._models

    def sizes(self, method: str, budget: int) -> tuple[int, int]:
        """(N policy samples, K candidates) of a method at a budget of k samples."""
        if method == "policy":
            return 1, 1
        if method == "robomonkey":
            return min(budget, self.options["samples"]), budget
        return budget, budget

    def detail(self, method: str, setting: str, budget: int | None) -> str:
        n, k = self.sizes(method, budget)
        return "single sample" if method == "policy" else f"N={n}, K={k}"

    def agent(self, method: str, budget: int, seed: int) -> RoboMonkeyPolicy:
        policy, verifier = self._load()
        n, k = self.sizes(method, budget)
        space = ActionSpace.box(-1.0, 1.0, dim=ACTION_DIM)
        strategy = "sample-verify" if method == "sample-verify" else "robomonkey"
        return RoboMonkeyPolicy(policy, verifier, space, n=k, policy_samples=n, strategy=strategy, seed=seed)

    def run(self, method: str, setting: str, budget: int | None, seed: int) -> dict[str, float]:
        self.check_method(method)
        self.check_setting(setting)
        if method == "policy" and (setting, seed) in self._baseline:
            return dict(self._baseline[(setting, seed)])
        with one_thread():
            metrics = self._episodes(method, setting, budget, seed)
        if method == "policy":
            self._baseline[(setting, seed)] = dict(metrics)
        self._errors.setdefault((setting, method, budget), []).append(metrics["action_error"])
        return metrics

    def _episodes(self, method: str, setting: str, budget: int, seed: int) -> dict[str, float]:
        wrapper = self.agent(method, budget, seed)
        agent = GymPolicy(wrapper)
        env = make_env(gear=self.options["ood_gear"] if setting == "ood-dynamics" else 1.0,
                       radius=OOD_RADIUS if setting == "ood-targets" else DEMO_RADIUS)
        errors, seconds, candidates, finals = [], [], [], []

        def record(obs, action, nxt, info):
            errors.append(float(np.sqrt(((np.clip(action, -1, 1) - expert_action(obs)) ** 2).mean())))
            diag = wrapper.diagnostics[-1]
            seconds.append(diag.seconds["total"])
            candidates.append(float(np.mean(diag.candidates)))

        for e in range(self.episodes):
            out = run_episode(env, agent, seed=derive_seed(seed, e, 0xEE) % 2 ** 31, on_step=record)
            finals.append(fingertip_distance(out["final_obs"]))
        env.close()
        finals = np.asarray(finals)
        return {"success": float((finals < self.options["success_radius"]).mean()),
                "final_distance": float(finals.mean()), "action_error": float(np.mean(errors)),
                "ms_per_step": 1e3 * float(np.median(seconds)), "candidates": float(np.mean(candidates))}

    def power_laws(self) -> dict[str, tuple[float, float]]:
        """(a, b) of e = a * k^b for robomonkey's mean action error over the budgets run, per setting."""
        fits = {}
        for setting in self.settings:
            pts = sorted((b, np.mean(v)) for (s, m, b), v in self._errors.items()
                         if s == setting and m == "robomonkey")
            if len(pts) >= 2:
                fits[setting] = power_law_fit(*zip(*pts))
        return fits

    def references(self, budgets: list[int]) -> dict[str, list[float]]:
        return {f"power law, {s}: e = {a:.3g} k^{b:.3g}": [a * k ** b for k in budgets]
                for s, (a, b) in self.power_laws().items()}

    def extra_plots(self, results: dict, out) -> list:
        """``vla-mujoco-power-law.png``: action error against samples on log-log axes, with the fitted power laws."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        settings = results["settings"]
        fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 4.2), squeeze=False)
        for ax, setting in zip(axes[0], settings):
            for method, marker in (("robomonkey", "o"), ("sample-verify", "s")):
                rows = sorted((r for r in results["rows"] if r["setting"] == setting and r["method"] == method),
                              key=lambda r: r["budget"])
                if not rows:
                    continue
                k = np.array([r["budget"] for r in rows], dtype=np.float64)
                e = np.array([r["metrics"]["action_error"] for r in rows])
                ci = np.array([r["metrics"]["action_error_ci95"] for r in rows])
                ax.errorbar(k, e, yerr=ci, marker=marker, linestyle="none", capsize=3, label=f"{method} (95% CI)")
                if method == "robomonkey" and len(k) >= 2:
                    a, b = power_law_fit(k, e)
                    grid = np.geomspace(k.min(), k.max(), 50)
                    ax.plot(grid, a * grid ** b, color="black", linewidth=1, label=f"fit e = {a:.3g} k^{b:.3g}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("samples k (K candidates)")
            ax.set_ylabel("action error (RMSE to the expert)")
            ax.set_title(setting)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        fig.suptitle(f"vla-mujoco: action error against samples, seeds {results['seeds']}")
        fig.tight_layout()
        path = out / "vla-mujoco-power-law.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return [path]

    def describe(self) -> dict:
        return {**super().describe(), "env": ENV_ID, "episodes_per_run": self.episodes,
                "policy": self.policy_config, "verifier": self.verifier_config,
                "power_laws": {s: {"a": a, "b": b} for s, (a, b) in self.power_laws().items()}}
