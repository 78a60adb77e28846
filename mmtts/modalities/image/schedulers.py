"""Stateless denoising steps over a batch of candidates, each at its own stage.

A diffusers scheduler is read once into a :class:`Schedule`: the model's
timestep at each stage and the signal/noise scales (alpha, sigma) of the
marginal x_t = alpha_t x0 + sigma_t eps at the T + 1 stage boundaries (VP:
alpha = sqrt(abar), sigma = sqrt(1 - abar); flow matching: alpha = 1 - sigma).
Every step is then a pure function of per-candidate stage indices, so
candidates at different stages share a batch, and a step returns what search
needs: the next latent, the x0 prediction and the std of the fresh noise it
added (sigma_t, zero for deterministic variants).

Three updates:
- ``ddim``: x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z with
  c = eta * sigma_s * sqrt(1 - (alpha_t sigma_s / (alpha_s sigma_t))^2), eta times the
  std of the true posterior q(x_s | x_t, x0); eta = 0 is deterministic. For flow matching the same formula with eta = 0 is
  exactly the Euler step, and eta > 0 the stochastic (SDE) variant whose
  marginals stay those of the model.
- ``ddpm``: the ancestral posterior q(x_s | x_t, x0) with the "fixed_small"
  variance, written as diffusers writes it (x0 and x_t coefficients), so
  clipping x0 behaves identically.
- Forward re-noising from stage i back to an earlier (noisier) stage j:
  x_j = (alpha_j / alpha_i) x_i + sqrt(sigma_j^2 - (alpha_j / alpha_i)^2 sigma_i^2) eps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.errors import MmttsError

UPDATES = ("ddim", "ddpm")
PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")


@dataclass
class Schedule:
    """Timesteps (T,) fed to the model, and alpha/sigma (T + 1,) at the stage boundaries (float64)."""

    timesteps: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    prediction: str
    update: str = "ddim"
    eta: float = 0.0
    clip_sample: float | None = None

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise MmttsError(f"prediction type {self.prediction!r} is not supported; one of {PREDICTIONS}")
        if self.update not in UPDATES:
            raise MmttsError(f"update {self.update!r} is not supported; one of {UPDATES}")
        if self.update == "ddpm" and self.prediction == "flow":
            raise MmttsError("the ddpm update needs a variance-preserving schedule; use update='ddim' for flow matching")
        if self.eta < 0:
            raise MmttsError(f"eta={self.eta} must be >= 0")
        n = len(self.timesteps)
        if self.alpha.shape != (n + 1,) or self.sigma.shape != (n + 1,):
            raise MmttsError("alpha and sigma need one more entry than timesteps (the stage boundaries)")

    @property
    def num_stages(self) -> int:
        return len(self.timesteps)

    @property
    def stochastic(self) -> bool:
        return self.update == "ddpm" or self.eta > 0

    def to_x0_eps(self, model_out: torch.Tensor, x: torch.Tensor, stage: torch.Tensor):
        """Convert the model's output at ``stage`` into (x0, eps) predictions."""
        a, s = _bcast(self.alpha[stage], x), _bcast(self.sigma[stage], x)
        out = model_out.to(torch.float64)
        xf = x.to(torch.float64)
        if self.prediction == "epsilon":
            eps = out
            x0 = (xf - s * eps) / a
        elif self.prediction == "v_prediction":
            x0 = a * xf - s * out
            eps = a * out + s * xf
        elif self.prediction == "sample":
            x0 = out
            eps = (xf - a * x0) / s
        else:  # flow: the model predicts the velocity v = eps - x0
            x0 = xf - s * out
            eps = xf + a * out
        if self.clip_sample is not None:
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
        return x0, eps

    def posterior_std(self, stage: torch.Tensor) -> torch.Tensor:
        """Std of the true posterior q(x_s | x_t, x0) from ``stage`` to the next (float64)."""
        at, st = self.alpha[stage], self.sigma[stage]
        as_, ss = self.alpha[stage + 1], self.sigma[stage + 1]
        return ss * (1 - (at * ss / (as_ * st)) ** 2).clamp(min=0).sqrt()

    def noise_std(self, stage: torch.Tensor) -> torch.Tensor:
        """Std of the fresh noise the update adds at ``stage`` (per candidate, float64)."""
        posterior = self.posterior_std(stage)
        if self.update == "ddpm":
            return posterior.clamp(min=1e-10)
        return self.eta * posterior

    def step(self, model_out, x, stage, noise):
        """One update for every candidate: returns (x_next, x0, sigma_t). ``noise`` is (B, ...) or None."""
        x0, eps = self.to_x0_eps(model_out, x, stage)
        c = self.noise_std(stage)
        as_, ss = _bcast(self.alpha[stage + 1], x), _bcast(self.sigma[stage + 1], x)
        if self.update == "ddpm":
            at, st = _bcast(self.alpha[stage], x), _bcast(self.sigma[stage], x)
            cur_alpha = (at / as_) ** 2
            cur_beta = 1 - cur_alpha
            coef_x0 = as_ * cur_beta / st ** 2
            coef_x = cur_alpha.sqrt() * ss ** 2 / st ** 2
            nxt = coef_x0 * x0 + coef_x * x.to(torch.float64)
            last = (stage + 1 >= self.num_stages)
            c = torch.where(last, torch.zeros_like(c), c)
        else:
            cb = _bcast(c, x)
            nxt = as_ * x0 + (ss ** 2 - cb ** 2).clamp(min=0).sqrt() * eps
        if bool((c > 0).any()):
            if noise is None:
                raise MmttsError("a stochastic step needs noise for every candidate")
            nxt = nxt + _bcast(c, x) * noise.to(torch.float64)
        return nxt.to(x.dtype), x0.to(x.dtype), c

    def renoise(self, x, stage_from: torch.Tensor, stage_to: torch.Tensor, noise):
        """Forward transition from ``stage_from`` to the noisier ``stage_to`` (<= stage_from)."""
        if bool((stage_to > stage_from).any()):
            raise MmttsError("re-noising goes to an earlier (noisier) stage")
        ai, si = _bcast(self.alpha[stage_from], x), _bcast(self.sigma[stage_from], x)
        aj, sj = _bcast(self.alpha[stage_to], x), _bcast(self.sigma[stage_to], x)
        r = aj / ai
        std = (sj ** 2 - (r * si) ** 2).clamp(min=0).sqrt()
        return (r * x.to(torch.float64) + std * noise.to(torch.float64)).to(x.dtype)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.device).reshape(-1, *([1] * (like.ndim - 1)))


def schedule_from_scheduler(scheduler, num_inference_steps: int, update: str | None = None, eta: float = 0.0,
                            clip_sample: bool | float | None = None) -> Schedule:
    """Read a configured diffusers scheduler (DDIM, DDPM or flow-matching Euler) into a Schedule.

    ``update`` defaults to the scheduler's own kind (DDPMScheduler -> "ddpm",
    anything else -> "ddim"). ``clip_sample`` defaults to the scheduler's config.
    """
    name = type(scheduler).__name__
    cfg = scheduler.config
    if num_inference_steps < 1:
        raise MmttsError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    scheduler.set_timesteps(num_inference_steps)
    if clip_sample is None:
        clip_sample = cfg.get("clip_sample_range", 1.0) if cfg.get("clip_sample", False) else None
    elif clip_sample is True:
        clip_sample = float(cfg.get("clip_sample_range", 1.0))
    elif clip_sample is False:
        clip_sample = None
    if hasattr(scheduler, "sigmas") and "FlowMatch" in name:
        sig = scheduler.sigmas.to(torch.float64).cpu()
        if len(sig) != num_inference_steps + 1:
            raise MmttsError(f"{name} gave {len(sig)} sigmas for {num_inference_steps} steps")
        timesteps = scheduler.timesteps.cpu()
        return Schedule(timesteps, 1 - sig, sig, "flow", update or "ddim", eta, clip_sample)
    if name not in ("DDIMScheduler", "DDPMScheduler"):
        raise MmttsError(f"{name} is not supported: use a DDIM, DDPM or flow-matching Euler scheduler "
                         "(e.g. DDIMScheduler.from_config(pipe.scheduler.config))")
    abar = scheduler.alphas_cumprod.to(torch.float64).cpu()
    timesteps = scheduler.timesteps.cpu().to(torch.int64)
    kind = update or ("ddpm" if name == "DDPMScheduler" else "ddim")
    if name == "DDIMScheduler":
        final = 1.0 if cfg.get("set_alpha_to_one", True) else float(abar[0])
        prev = timesteps - cfg["num_train_timesteps"] // num_inference_steps
    else:
        final = 1.0
        prev = torch.cat([timesteps[1:], torch.tensor([-1])])
    abar_t = abar[timesteps]
    abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], torch.full_like(abar_t, final))
    bounds = torch.cat([abar_t, abar_prev[-1:]])
    if not torch.allclose(abar_prev[:-1], abar_t[1:]):
        raise MmttsError(f"{name}'s timestep spacing is not contiguous for {num_inference_steps} steps; "
                         "use timestep_spacing='leading' or a step count that divides the training steps")
    pred = cfg.get("prediction_type", "epsilon")
    return Schedule(timesteps, bounds.sqrt(), (1 - bounds).sqrt(), pred, kind, eta, clip_sample)
