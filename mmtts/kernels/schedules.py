"""Step coefficients for the fused denoising step, from scheduler quantities.

Each helper turns per-candidate scheduler quantities (tensors of shape (B,),
so candidates may sit at different timesteps) into the
:class:`~mmtts.kernels.denoise.StepCoefficients` of ``x0 = x0_a*x +
x0_b*out`` and ``x_next = a*x + b*out + c*z`` (``+ d*clip(x0)`` when x0 is
clipped). They
follow the update rules of diffusers' DDIMScheduler, DDPMScheduler and
FlowMatchEulerDiscreteScheduler; :func:`coefficients_from_scheduler` reads the
quantities from such a scheduler, and the image Process's ``Schedule`` builds
its table of every stage with :func:`alpha_sigma_coefficients`. Clipping x0
(``clip_sample``) is the ``clip`` correction; dynamic thresholding depends on
the whole sample, so it is refused rather than silently skipped.
"""

from __future__ import annotations

import torch

from .denoise import StepCoefficients

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def _f64(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64).reshape(-1)


def _to_x0_eps(alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str):
    """(p, q, r, s) with x0 = p*x + q*out and eps = r*x + s*out, for x = alpha*x0 + sigma*eps.

    ``flow`` is a velocity model, out = eps - x0 (with alpha = 1 - sigma).
    """
    one, zero = torch.ones_like(alpha), torch.zeros_like(alpha)
    if prediction_type == "epsilon":
        return 1 / alpha, -sigma / alpha, zero, one
    if prediction_type == "v_prediction":
        return alpha, -sigma, sigma, alpha
    if prediction_type == "sample":
        return zero, one, 1 / sigma, -alpha / sigma
    if prediction_type == "flow":
        return one, -sigma, one, alpha
    raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")


def _pack(a, b, c, x0_a, x0_b, d, clip=None) -> StepCoefficients:
    """Float64 coefficients of one length from ``x_next = a*x + b*out + c*z + d*x0``.

    Without ``clip`` the x0 term folds into ``a`` and ``b``; with it, it stays
    apart (x0 is clipped first), so a large x0 is never added and taken away.
    """
    if clip is None:
        parts = (a + d * x0_a, b + d * x0_b, c, x0_a, x0_b)
    else:
        parts = (a, b, c, x0_a, x0_b, d, _f64(clip))
    n = max(t.numel() for t in parts)
    return StepCoefficients(*(t.expand(n).contiguous() for t in parts))


def posterior_std(alpha_t, sigma_t, alpha_next, sigma_next) -> torch.Tensor:
    """Std of the true posterior q(x_next | x, x0) between marginals ``x = alpha*x0 + sigma*eps`` (float64)."""
    at, st, an, sn = _f64(alpha_t), _f64(sigma_t), _f64(alpha_next), _f64(sigma_next)
    return sn * (1 - (at * sn / (an * st)) ** 2).clamp_min(0).sqrt()


UPDATES = ("ddim", "ddpm", "euler")
DDPM_VARIANCES = ("fixed_small", "fixed_large")


def alpha_sigma_coefficients(alpha_t, sigma_t, alpha_next, sigma_next, prediction_type: str = "epsilon",
                             update: str = "ddim", eta=0.0, final=None, clip=None,
                             variance: str = "fixed_small") -> StepCoefficients:
    """A step between marginals ``x = alpha*x0 + sigma*eps`` (VP: alpha = sqrt(abar); flow: alpha = 1 - sigma).

    - ``ddim``: ``x_next = alpha_next*x0 + sqrt(sigma_next**2 - c**2)*eps + c*z``
      with ``c = eta * posterior_std``, the std of q(x_next | x, x0); for flow
      matching eta = 0 is the Euler step.
    - ``euler``: the same with ``c = eta * sigma_next``: a fraction eta of the
      noise part is fresh (flow matching: eta = 1 is diffusers'
      ``stochastic_sampling``, eta = 0 the Euler step).
    - ``ddpm``: the ancestral posterior mean plus noise with the
      ``fixed_small`` std (the posterior's, floored at 1e-10 as diffusers
      floors the variance at 1e-20) or the ``fixed_large`` one
      (sqrt(1 - alpha_t**2 / alpha_next**2), the step's beta); no noise where
      ``final`` is True (diffusers: where the timestep is 0; default: where
      ``sigma_next`` is 0). ``eta`` must be 0.

    ``clip`` bounds x0 (diffusers' ``clip_sample_range``); eps stays the one
    the model output implies, as diffusers computes it before clipping.
    """
    at, st, an, sn, eta = _f64(alpha_t), _f64(sigma_t), _f64(alpha_next), _f64(sigma_next), _f64(eta)
    if update not in UPDATES:
        raise ValueError(f"update {update!r} is not one of {UPDATES}")
    p, q, r, s = _to_x0_eps(at, st, prediction_type)
    if update in ("ddim", "euler"):
        c = eta * (posterior_std(at, st, an, sn) if update == "ddim" else sn)
        direction = (sn**2 - c**2).clamp_min(0).sqrt()
        return _pack(direction * r, direction * s, c, p, q, an, clip)
    if prediction_type == "flow":
        raise ValueError("the ddpm update needs a variance-preserving schedule; use update='ddim' or 'euler' for "
                         "flow matching")
    if bool((eta != 0).any()):
        raise ValueError("the ddpm update has no eta (its noise is the posterior's); use update='ddim' with eta")
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"variance {variance!r} is not one of {DDPM_VARIANCES}")
    alpha_step = (at / an) ** 2
    coef_x0 = an * (1 - alpha_step) / st**2
    coef_x = alpha_step.sqrt() * sn**2 / st**2
    if variance == "fixed_large":
        std = (1 - alpha_step).sqrt()
    else:
        std = (sn**2 / st**2 * (1 - alpha_step)).clamp_min(1e-20).sqrt()
    final = sn == 0 if final is None else torch.as_tensor(final, dtype=torch.bool).reshape(-1)
    c = torch.where(final, torch.zeros_like(std), std)
    return _pack(coef_x, torch.zeros_like(coef_x), c, p, q, coef_x0, clip)


def ddim_coefficients(alpha_prod_t, alpha_prod_prev, eta=0.0, prediction_type: str = "epsilon",
                      clip=None) -> StepCoefficients:
    """DDIM (Song et al.) with stochasticity ``eta`` (0: deterministic, 1: DDPM-like variance), x0 within ``clip``."""
    at, ap = _f64(alpha_prod_t), _f64(alpha_prod_prev)
    return alpha_sigma_coefficients(at.sqrt(), (1 - at).sqrt(), ap.sqrt(), (1 - ap).sqrt(), prediction_type,
                                    "ddim", eta, clip=clip)


DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


def ddpm_variance(variance_type: str) -> str:
    """The ``ddpm`` update's variance for a diffusers ``variance_type``; the others are refused with the reason."""
    if variance_type in ("fixed_small", "fixed_small_log"):  # the same std: diffusers' log form is exp(log(var) / 2)
        return "fixed_small"
    if variance_type == "fixed_large":
        return "fixed_large"
    if variance_type in ("learned", "learned_range"):
        raise ValueError(f"variance_type={variance_type!r} takes the variance from the model's output, which the "
                         "step does not read; use 'fixed_small' or 'fixed_large'")
    raise ValueError(f"variance_type={variance_type!r} is not supported (diffusers takes the square root of a log "
                     f"variance for 'fixed_large_log'); use one of {DDPM_VARIANCE_TYPES}")


def ddpm_coefficients(alpha_prod_t, alpha_prod_prev, prediction_type: str = "epsilon",
                      variance_type: str = "fixed_small", clip=None, final=None) -> StepCoefficients:
    """DDPM ancestral step (Ho et al.), x0 bounded by ``clip``.

    No noise where ``final`` is True: diffusers adds none at timestep 0
    (default: where ``alpha_prod_prev`` is 1, the end of a leading schedule).
    """
    at, ap = _f64(alpha_prod_t), _f64(alpha_prod_prev)
    return alpha_sigma_coefficients(at.sqrt(), (1 - at).sqrt(), ap.sqrt(), (1 - ap).sqrt(), prediction_type,
                                    "ddpm", final=ap >= 1 if final is None else final, clip=clip,
                                    variance=ddpm_variance(variance_type))


def flow_match_coefficients(sigma, sigma_next, eta=0.0) -> StepCoefficients:
    """Rectified-flow step for a velocity model, ``x = (1-sigma)*x0 + sigma*noise``, ``out = noise - x0``.

    ``x_next = (1-sigma_next)*x0 + sigma_next*(sqrt(1-eta**2)*eps + eta*z)``
    with ``eps`` the noise implied by ``out`` (the ``euler`` update): eta = 0
    is the Euler ODE step, eta = 1 is diffusers' ``stochastic_sampling``
    (fresh noise at each step); every eta keeps the noise level at ``sigma_next``.
    """
    s, sn, eta = _f64(sigma), _f64(sigma_next), _f64(eta)
    if bool(((eta < 0) | (eta > 1)).any()):
        raise ValueError("eta must lie in [0, 1] for the flow-matching step")
    return alpha_sigma_coefficients(1 - s, s, 1 - sn, sn, "flow", "euler", eta)


def _clip_of(config):
    """The x0 bound of a DDIM/DDPM scheduler config (None without ``clip_sample``); thresholding is refused."""
    if getattr(config, "thresholding", False):
        raise ValueError("the scheduler thresholds x0 dynamically (a quantile of each sample), which the fused step "
                         "cannot express; build it with thresholding=False (clip_sample is supported)")
    return float(config.clip_sample_range) if getattr(config, "clip_sample", False) else None


def coefficients_from_scheduler(scheduler, timesteps, eta: float | None = None) -> StepCoefficients:
    """Coefficients of ``scheduler.step`` at per-candidate ``timesteps`` (after ``set_timesteps``).

    Supports DDIMScheduler (``eta`` defaults to 0; any timestep spacing, since
    each step is read on its own), DDPMScheduler (``eta`` must stay None; its
    ``variance_type`` and no noise at timestep 0, as diffusers) and
    FlowMatchEulerDiscreteScheduler (``eta`` defaults to 1 with
    ``stochastic_sampling`` and 0 without). ``clip_sample`` becomes the
    ``clip`` correction; thresholding is refused.
    """
    kind = type(scheduler).__name__
    if kind not in ("DDIMScheduler", "DDPMScheduler", "FlowMatchEulerDiscreteScheduler"):
        raise TypeError(f"no step coefficients for {kind}; use DDIMScheduler, DDPMScheduler or "
                        "FlowMatchEulerDiscreteScheduler, or call ddim/ddpm/flow_match_coefficients directly")
    config = scheduler.config
    t = torch.as_tensor(timesteps).reshape(-1).cpu()
    if kind == "DDIMScheduler":
        clip = _clip_of(config)
        ac = scheduler.alphas_cumprod.to(torch.float64)
        step = config.num_train_timesteps // scheduler.num_inference_steps
        prev = t.long() - step
        ap = torch.where(prev >= 0, ac[prev.clamp_min(0)], _f64(scheduler.final_alpha_cumprod))
        return ddim_coefficients(ac[t.long()], ap, 0.0 if eta is None else eta, config.prediction_type, clip)
    if kind == "DDPMScheduler":
        clip = _clip_of(config)
        if eta is not None:
            raise ValueError("DDPMScheduler has no eta; leave eta=None (use DDIMScheduler with eta=1 instead)")
        ac = scheduler.alphas_cumprod.to(torch.float64)
        prev = torch.tensor([int(scheduler.previous_timestep(int(ti))) for ti in t])
        ap = torch.where(prev >= 0, ac[prev.clamp_min(0)], torch.ones((), dtype=torch.float64))
        return ddpm_coefficients(ac[t.long()], ap, config.prediction_type, config.variance_type, clip, final=t == 0)
    sched_t = scheduler.timesteps.to(torch.float64).cpu()  # FlowMatchEulerDiscreteScheduler
    dist = (sched_t[None, :] - t.to(torch.float64)[:, None]).abs()
    index = dist.argmin(dim=1)
    if bool((dist.min(dim=1).values > 1e-3 * config.num_train_timesteps).any()):
        raise ValueError(f"timesteps {t.tolist()} are not among scheduler.timesteps; call set_timesteps first")
    sigmas = scheduler.sigmas.to(torch.float64).cpu()
    if eta is None:
        eta = 1.0 if config.stochastic_sampling else 0.0
    return flow_match_coefficients(sigmas[index], sigmas[index + 1], eta)
