"""Denoising schedules over a batch of candidates, each at its own stage.

A diffusers scheduler is read once into a :class:`Schedule`: the model's
timestep at each stage and the signal/noise scales (alpha, sigma) of the
marginal x_t = alpha_t x0 + sigma_t eps at the T + 1 stage boundaries (VP:
alpha = sqrt(abar), sigma = sqrt(1 - abar); flow matching: alpha = 1 - sigma).
The schedule turns these into the :class:`~mmtts.kernels.StepCoefficients` of
every stage, once; a step is then :func:`mmtts.kernels.denoise_step` on the
coefficients of each candidate's stage, so candidates at different stages
share a batch and every device runs the one definition of the update.

Three updates (:func:`mmtts.kernels.alpha_sigma_coefficients`):
- ``ddim``: x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z with
  c = eta * sigma_s * sqrt(1 - (alpha_t sigma_s / (alpha_s sigma_t))^2), eta
  times the std of the true posterior q(x_s | x_t, x0); eta = 0 is
  deterministic. For flow matching the same formula with eta = 0 is exactly
  the Euler step, and eta > 0 a stochastic variant whose marginals stay those
  of the model.
- ``euler``: the same with c = eta * sigma_s (a fraction eta of the noise is
  fresh): for flow matching, eta = 1 is diffusers' ``stochastic_sampling``.
- ``ddpm``: the ancestral posterior q(x_s | x_t, x0) with the "fixed_small"
  or "fixed_large" variance, written as diffusers writes it (x0 and x_t
  coefficients), so clipping x0 behaves identically; no noise at timestep 0.

:func:`schedule_from_scheduler` accepts a diffusers configuration only when
these steps reproduce its ``scheduler.step``, and refuses the others with the
setting to change.

Forward re-noising from stage i back to an earlier (noisier) stage j:
x_j = (alpha_j / alpha_i) x_i + sqrt(sigma_j^2 - (alpha_j / alpha_i)^2 sigma_i^2) eps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...core.errors import MmttsError
from ...kernels import StepCoefficients, alpha_sigma_coefficients, posterior_std
from ...kernels.schedules import ddpm_variance

UPDATES = ("ddim", "ddpm", "euler")
VARIANCES = ("fixed_small", "fixed_large")
PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")


@dataclass(frozen=True, eq=False)
class Schedule:
    """The stages of a first-order sampler, with the step coefficients of each (immutable: built once).

    Args:
        timesteps: (T,) what the model is fed at each stage.
        alpha, sigma: (T + 1,) signal and noise scales at the stage boundaries (float64).
        prediction: what the model predicts: ``epsilon``, ``v_prediction``, ``sample`` or ``flow`` (velocity).
        update: ``ddim`` or ``euler`` (with ``eta``), or ``ddpm`` (ancestral).
        eta: stochasticity of the ``ddim`` and ``euler`` updates (0: deterministic); 0 for ``ddpm``.
        clip_sample: bound of the x0 prediction, or None.
        variance: the ``ddpm`` noise: ``fixed_small`` (the posterior's) or ``fixed_large`` (the step's beta).

    Attributes:
        coefficients: the :class:`~mmtts.kernels.StepCoefficients` of every stage, (T,) each; ``ddpm`` adds
            no noise at timestep 0.
        posterior: (T,) std of the true posterior q(x_s | x_t, x0) from each stage to the next (float64).
    """

    timesteps: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    prediction: str
    update: str = "ddim"
    eta: float = 0.0
    clip_sample: float | None = None
    variance: str = "fixed_small"
    coefficients: StepCoefficients = field(init=False, repr=False)
    posterior: torch.Tensor = field(init=False, repr=False)
    _table: torch.Tensor = field(init=False, repr=False)  # the coefficients stacked (fields, T): one gather per step

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise MmttsError(f"prediction type {self.prediction!r} is not supported; one of {PREDICTIONS}")
        if self.update not in UPDATES:
            raise MmttsError(f"update {self.update!r} is not supported; one of {UPDATES}")
        if self.update == "ddpm" and self.prediction == "flow":
            raise MmttsError("the ddpm update needs a variance-preserving schedule; use update='ddim' or 'euler' for "
                             "flow matching")
        if self.update == "ddpm" and self.eta != 0:
            raise MmttsError(f"the ddpm update has no eta (got eta={self.eta}): its noise is the posterior's; use "
                             "update='ddim' with eta to scale it")
        if self.eta < 0 or (self.update == "euler" and self.eta > 1):
            raise MmttsError(f"eta={self.eta} must be >= 0 (and at most 1 for the euler update)")
        if self.variance not in VARIANCES:
            raise MmttsError(f"variance {self.variance!r} is not supported; one of {VARIANCES}")
        n = len(self.timesteps)
        if self.alpha.shape != (n + 1,) or self.sigma.shape != (n + 1,):
            raise MmttsError("alpha and sigma need one more entry than timesteps (the stage boundaries)")
        alpha, sigma = self.alpha.to(torch.float64).cpu(), self.sigma.to(torch.float64).cpu()
        at, st, an, sn = alpha[:-1], sigma[:-1], alpha[1:], sigma[1:]
        final = torch.as_tensor(self.timesteps).cpu() <= 0  # diffusers' DDPM adds no noise at timestep 0
        coefs = alpha_sigma_coefficients(at, st, an, sn, self.prediction, self.update, self.eta, final=final,
                                         clip=self.clip_sample, variance=self.variance)
        object.__setattr__(self, "coefficients", coefs)  # frozen: derived once, here
        object.__setattr__(self, "_table", torch.stack([t for t in coefs if t is not None]))
        object.__setattr__(self, "posterior", posterior_std(at, st, an, sn))

    @property
    def num_stages(self) -> int:
        return len(self.timesteps)

    @property
    def stochastic(self) -> bool:
        """Whether a step draws fresh noise (even where its std is 0, as on a DDPM schedule's last step)."""
        return self.update == "ddpm" or self.eta > 0

    def step_coefficients(self, stage: torch.Tensor) -> StepCoefficients:
        """The coefficients of each candidate's step, for per-candidate ``stage`` (B,) in [0, T)."""
        stage = torch.as_tensor(stage).cpu()
        lo, hi = torch.aminmax(stage)
        if int(lo) < 0 or int(hi) >= self.num_stages:
            raise MmttsError(f"stages {stage.tolist()} outside [0, {self.num_stages}): finished candidates take no "
                             "step")
        return StepCoefficients(*self._table[:, stage].unbind(0))

    def posterior_std(self, stage: torch.Tensor) -> torch.Tensor:
        """Std of the true posterior q(x_s | x_t, x0) from ``stage`` to the next (float64)."""
        return self.posterior[torch.as_tensor(stage).cpu()]

    def noise_std(self, stage: torch.Tensor) -> torch.Tensor:
        """Std of the fresh noise the update adds at ``stage`` (per candidate, float64; 0 when deterministic)."""
        return self.coefficients.c[torch.as_tensor(stage).cpu()].to(torch.float64)

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


def schedule_from_scheduler(scheduler, num_inference_steps: int, update: str | None = None, eta: float | None = None,
                            clip_sample: bool | float | None = None) -> Schedule:
    """Read a configured diffusers scheduler (DDIM, DDPM or flow-matching Euler) into a Schedule.

    With ``update`` and ``eta`` left None the schedule steps as the
    scheduler's own ``step`` does: DDIMScheduler -> ``ddim`` with eta 0,
    DDPMScheduler -> ``ddpm`` with its ``variance_type``,
    FlowMatchEulerDiscreteScheduler -> the Euler step (``euler`` with eta 1
    under ``stochastic_sampling``). ``update`` and ``eta`` choose another
    update over the same noise levels. ``clip_sample`` defaults to the
    scheduler's config. Settings the steps cannot reproduce (dynamic
    thresholding, learned variances, DDIM's linspace spacing) are refused
    with the setting to change.
    """
    name = type(scheduler).__name__
    cfg = scheduler.config
    if num_inference_steps < 1:
        raise MmttsError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    if cfg.get("thresholding", False):
        raise MmttsError(f"{name} has thresholding=True: dynamic thresholding clips each x0 at a quantile of its "
                         "own values, which the denoising step does not do; build the scheduler with "
                         "thresholding=False (clip_sample=True clips at a fixed bound and is supported)")
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
        if cfg.get("stochastic_sampling", False):
            if update not in (None, "euler") or eta not in (None, 1.0):
                raise MmttsError(f"{name} has stochastic_sampling=True, which is update='euler' with eta=1 (fresh "
                                 f"noise at every step); got update={update!r}, eta={eta!r}: leave them unset, or "
                                 "build the scheduler with stochastic_sampling=False to choose them")
            update, eta = "euler", 1.0
        return Schedule(timesteps, 1 - sig, sig, "flow", update or "ddim", eta or 0.0, clip_sample)
    if name not in ("DDIMScheduler", "DDPMScheduler"):
        raise MmttsError(f"{name} is not supported: use a DDIM, DDPM or flow-matching Euler scheduler "
                         "(e.g. DDIMScheduler.from_config(pipe.scheduler.config))")
    abar = scheduler.alphas_cumprod.to(torch.float64).cpu()
    timesteps = scheduler.timesteps.cpu().to(torch.int64)
    kind = update or ("ddpm" if name == "DDPMScheduler" else "ddim")
    variance = "fixed_small"
    if kind == "ddpm":
        if eta:
            raise MmttsError(f"the ddpm update has no eta (got eta={eta}): its noise is the posterior's; pass "
                             "update='ddim' with eta to scale the posterior noise, or leave eta unset")
        try:
            variance = ddpm_variance(cfg.get("variance_type", "fixed_small"))
        except ValueError as e:
            raise MmttsError(f"{name}: {e}") from None
    if name == "DDIMScheduler":
        final = 1.0 if cfg.get("set_alpha_to_one", True) else float(abar[0])
        prev = timesteps - cfg["num_train_timesteps"] // num_inference_steps
    else:
        final = 1.0
        prev = torch.cat([timesteps[1:], torch.tensor([-1])])
    abar_t = abar[timesteps]
    abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], torch.full_like(abar_t, final))
    bounds = torch.cat([abar_t, abar_prev[-1:]])
    if not torch.equal(prev[:-1], timesteps[1:]):
        spacing = cfg.get("timestep_spacing", "leading")
        raise MmttsError(f"{name} with timestep_spacing={spacing!r} and {num_inference_steps} steps steps each "
                         f"timestep t to t - {cfg['num_train_timesteps'] // num_inference_steps}, which is not the "
                         f"next timestep it feeds the model ({timesteps[:3].tolist()}...), so a stage would not "
                         f"end where the next begins; use timestep_spacing='leading' (or 'trailing' with a step "
                         f"count that divides num_train_timesteps={cfg['num_train_timesteps']})")
    pred = cfg.get("prediction_type", "epsilon")
    return Schedule(timesteps, bounds.sqrt(), (1 - bounds).sqrt(), pred, kind, eta or 0.0, clip_sample, variance)
