"""Differential test: the image schedules and the kernels' coefficient helpers against diffusers' ``scheduler.step``.

Over a grid of scheduler configurations (DDIM: eta, prediction type, beta
schedule, timestep spacing, step count, ``set_alpha_to_one``,
``clip_sample``, ``thresholding``; DDPM: variance type, prediction type,
spacing, step count; FlowMatchEuler: shift, ``stochastic_sampling``), in
float32 and float64, a random tiny UNet runs a whole trajectory through
diffusers and through ``schedule_from_scheduler`` + ``denoise_step``, from the
same initial noise and with the same per-step noise. Every accepted
configuration must match; every other one must be refused. In float32 a
whole trajectory can amplify rounding (a random UNet over 50 clipped steps):
there the match is held to diffusers' own float32 error against its float64
run, and one step at a time (through the coefficient helpers) to rounding. The default run
checks a seeded subset; ``-m slow`` runs the whole grid. ``python
tests/test_denoise_diffusers_parity.py`` prints the grid's counts and largest
differences (what docs/kernels.md quotes).
"""

from __future__ import annotations

import functools
import itertools
import random

import pytest
import torch

SHAPE = (2, 1, 8, 8)
# Relative to max|x| over a whole trajectory: float32 rounding; float64 with diffusers' alphas_cumprod in float64
# too (FlowMatchEuler steps in float32 whatever the input, so it is held to the float32 tolerance).
TOL = {torch.float32: 2e-5, torch.float64: 1e-10}


def configs():
    """Every configuration of the grid, as (scheduler class name, config kwargs, steps)."""
    out = []
    for eta, pred, beta, spacing, steps, one, clip in itertools.product(
            (0.0, 1.0), ("epsilon", "v_prediction", "sample"), ("linear", "scaled_linear", "squaredcos_cap_v2"),
            ("leading", "trailing", "linspace"), (4, 10, 50), (True, False), (False, True)):
        out.append(("DDIMScheduler", {"prediction_type": pred, "beta_schedule": beta, "timestep_spacing": spacing,
                                      "set_alpha_to_one": one, "clip_sample": clip, "eta": eta}, steps))
    for pred, thresholding in itertools.product(("epsilon", "sample"), (False, True)):
        out.append(("DDIMScheduler", {"prediction_type": pred, "thresholding": thresholding, "clip_sample": False,
                                      "eta": 0.0}, 10))
    for variance, pred, spacing, steps in itertools.product(
            ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"),
            ("epsilon", "v_prediction", "sample"), ("leading", "trailing"), (4, 10)):
        out.append(("DDPMScheduler", {"variance_type": variance, "prediction_type": pred,
                                      "timestep_spacing": spacing}, steps))
    out.append(("DDPMScheduler", {"thresholding": True, "clip_sample": False}, 10))
    out.append(("DDPMScheduler", {"eta": 0.5}, 10))
    for shift, stochastic, steps in itertools.product((1.0, 3.0), (False, True), (4, 10, 50)):
        out.append(("FlowMatchEulerDiscreteScheduler", {"shift": shift, "stochastic_sampling": stochastic}, steps))
    return out


def refused(kind: str, cfg: dict) -> bool:
    """What schedule_from_scheduler must refuse: the settings its steps cannot reproduce."""
    if cfg.get("thresholding") or (kind == "DDPMScheduler" and cfg.get("eta")):
        return True
    if kind == "DDIMScheduler" and cfg.get("timestep_spacing") == "linspace":
        return True
    return kind == "DDPMScheduler" and cfg.get("variance_type") in ("fixed_large_log", "learned", "learned_range")


def _scheduler(kind: str, cfg: dict, dtype=torch.float32):
    """The diffusers scheduler; for float64 runs its alphas_cumprod in float64 (the same values), so its
    step computes its coefficients in float64 rather than rounding them to float32."""
    import diffusers

    cfg = {k: v for k, v in cfg.items() if k != "eta"}
    if kind == "FlowMatchEulerDiscreteScheduler":
        return getattr(diffusers, kind)(**cfg)
    sched = getattr(diffusers, kind)(num_train_timesteps=1000, **cfg)
    if dtype == torch.float64:
        sched.alphas_cumprod = sched.alphas_cumprod.double()
        if hasattr(sched, "final_alpha_cumprod"):
            sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
    return sched


def _tol(kind, dtype):
    return TOL[torch.float32 if kind == "FlowMatchEulerDiscreteScheduler" else dtype]


@functools.lru_cache(maxsize=None)
def _unet(dtype):
    from image_fixtures import tiny_unet

    return tiny_unet().to(dtype)


def _noise(i: int, dtype) -> torch.Tensor:
    """Step i's noise, drawn as diffusers' randn_tensor draws it from a generator seeded with 100 + i."""
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i), dtype=dtype)


def run_diffusers(kind, cfg, steps, unet, x):
    sched = _scheduler(kind, cfg, x.dtype)
    sched.set_timesteps(steps)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            out = unet(x, t).sample
            if kind == "DDIMScheduler":
                x = sched.step(out, t, x, eta=cfg["eta"], variance_noise=_noise(i, x.dtype)).prev_sample
            else:  # DDPM and FlowMatchEuler draw from the generator (FlowMatchEuler in float32, its step's dtype)
                g = torch.Generator().manual_seed(100 + i)
                x = sched.step(out, t, x, generator=g).prev_sample
    return x


def run_mmtts(kind, cfg, steps, unet, x):
    from mmtts.kernels import denoise_step
    from mmtts.modalities.image import schedule_from_scheduler

    schedule = schedule_from_scheduler(_scheduler(kind, cfg), steps, eta=cfg.get("eta") or None)
    noise_dtype = torch.float32 if kind == "FlowMatchEulerDiscreteScheduler" else x.dtype
    with torch.no_grad():
        for i in range(schedule.num_stages):
            out = unet(x, schedule.timesteps[i].expand(SHAPE[0])).sample
            z = _noise(i, noise_dtype) if schedule.stochastic else None
            x, _ = denoise_step(x, out, schedule.step_coefficients(torch.full((SHAPE[0],), i)), z=z)
    return x


def run_helpers(kind, cfg, steps, unet, x):
    """coefficients_from_scheduler + denoise_step one step at a time against diffusers' step on the same input."""
    from mmtts.kernels import coefficients_from_scheduler, denoise_step

    sched = _scheduler(kind, cfg, x.dtype)
    sched.set_timesteps(steps)
    worst = 0.0
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            out = unet(x, t).sample
            eta = cfg["eta"] if kind == "DDIMScheduler" else None
            coefs = coefficients_from_scheduler(sched, t.reshape(1).expand(SHAPE[0]), eta=eta)
            noise_dtype = torch.float32 if kind == "FlowMatchEulerDiscreteScheduler" else x.dtype
            ours, _ = denoise_step(x, out, coefs, z=_noise(i, noise_dtype))
            if kind == "DDIMScheduler":
                theirs = sched.step(out, t, x, eta=cfg["eta"], variance_noise=_noise(i, x.dtype)).prev_sample
            else:
                theirs = sched.step(out, t, x, generator=torch.Generator().manual_seed(100 + i)).prev_sample
            worst = max(worst, float((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1)))
            x = theirs
    return worst


def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1))


def compare(kind, cfg, steps, dtype) -> tuple[float, float] | None:
    """The trajectory's largest difference to diffusers relative to max|x|, and what it may be (the tolerance,
    or in float32 twice diffusers' own float32 error when that is larger); None when refused."""
    from mmtts.core import MmttsError

    unet = _unet(dtype)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=dtype)
    try:
        ours = run_mmtts(kind, cfg, steps, unet, x)
    except MmttsError:
        assert refused(kind, cfg), f"{kind} {cfg} {steps} steps was refused"
        return None
    assert not refused(kind, cfg), f"{kind} {cfg} {steps} steps was accepted"
    theirs = run_diffusers(kind, cfg, steps, unet, x)
    assert ours.dtype == theirs.dtype == dtype
    diff, allowed = _rel(ours, theirs), _tol(kind, dtype)
    if dtype == torch.float32 and diff > allowed:
        exact = run_diffusers(kind, cfg, steps, _unet(torch.float64), x.double())
        allowed = max(allowed, 2 * _rel(theirs, exact))
    return diff, allowed


GRID = [(kind, cfg, steps, dtype) for kind, cfg, steps in configs() for dtype in (torch.float32, torch.float64)]
SUBSET = random.Random(0).sample(range(len(GRID)), 16)


def _ids(case):
    kind, cfg, steps, dtype = case
    return f"{kind[:4]}-{'-'.join(f'{k}={v}' for k, v in cfg.items())}-{steps}-{str(dtype)[6:]}"


def _check(case):
    kind, cfg, steps, dtype = case
    result = compare(kind, cfg, steps, dtype)
    if result is not None:
        diff, allowed = result
        assert diff <= allowed, f"relative difference {diff:.3g}, allowed {allowed:.3g}"


@pytest.mark.parametrize("case", [GRID[i] for i in SUBSET], ids=_ids)
def test_schedule_steps_as_diffusers(case):
    _check(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", GRID, ids=_ids)
def test_schedule_steps_as_diffusers_whole_grid(case):
    _check(case)


def _check_helpers(case):
    from mmtts.core import MmttsError

    kind, cfg, steps, dtype = case
    unet = _unet(dtype)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=dtype)
    try:
        worst = run_helpers(kind, cfg, steps, unet, x)
    except (ValueError, MmttsError) as e:  # thresholding and the model-output variances are not affine
        assert cfg.get("thresholding") or cfg.get("eta") and kind == "DDPMScheduler" or \
            cfg.get("variance_type") in ("fixed_large_log", "learned", "learned_range"), str(e)
        return
    assert worst <= _tol(kind, dtype), worst


@pytest.mark.parametrize("case", [GRID[i] for i in SUBSET[:8]], ids=_ids)
def test_coefficient_helpers_step_as_diffusers(case):
    _check_helpers(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", GRID, ids=_ids)
def test_coefficient_helpers_step_as_diffusers_whole_grid(case):
    _check_helpers(case)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(1)
    worst = {"float32": 0.0, "float64": 0.0, "float64, FlowMatchEuler": 0.0}
    accepted = rejected = amplified = 0
    for kind, cfg, steps, dtype in GRID:
        result = compare(kind, cfg, steps, dtype)
        if result is None:
            rejected += 1
            continue
        accepted += 1
        diff, allowed = result
        assert diff <= allowed, (kind, cfg, steps, dtype, diff, allowed)
        amplified += diff > _tol(kind, dtype)
        key = str(dtype)[6:] + (", FlowMatchEuler" if dtype == torch.float64 and kind.startswith("Flow") else "")
        worst[key] = max(worst[key], diff)
    print(f"{len(GRID)} configurations compared ({len(GRID) // 2} in float32 and in float64): {accepted} accepted, "
          f"{rejected} refused; largest difference relative to max|x|: " +
          ", ".join(f"{k} {v:.1e}" for k, v in worst.items()) +
          f"; {amplified} float32 trajectories past {TOL[torch.float32]:g}, each within twice diffusers' own "
          "float32 error")
