"""One fused denoising step over a population of candidates.

Every first-order sampler step the image Process takes (DDIM with any eta,
DDPM, flow-matching Euler with or without fresh noise) is, per candidate, an
affine map of the current sample ``x``, the model output and fresh noise ``z``::

    x_next = a * x + b * out + c * z
    x0     = x0_a * x + x0_b * out          (the preview verifiers score)

with scalars per candidate, so candidates may sit at different timesteps. The
coefficients come from :mod:`mmtts.kernels.schedules`; ``c`` is the sampler's
own stochastic standard deviation at that step. Fusing the step reads ``x``
and ``out`` once and writes both results in one pass; the noise is drawn in
registers from each candidate's (seed, offset) stream when ``z`` is not given.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .dispatch import use_triton
from .philox import check_seed_offset, philox_normal_reference

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class StepCoefficients(NamedTuple):
    """Per-candidate coefficients of one step, each a float tensor of shape (B,)."""

    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    x0_a: torch.Tensor
    x0_b: torch.Tensor

    def to(self, device) -> "StepCoefficients":
        """On ``device`` in float32, the precision the step computes in."""
        return StepCoefficients(*(t.to(device=device, dtype=torch.float32) for t in self))

    def select(self, index: torch.Tensor) -> "StepCoefficients":
        """The coefficients of the candidates at ``index`` (to follow a State through resampling)."""
        return StepCoefficients(*(t[index] for t in self))

    @staticmethod
    def cat(items) -> "StepCoefficients":
        return StepCoefficients(*(torch.cat(ts) for ts in zip(*items)))


def _check(x, out, coefs, z):
    if not isinstance(coefs, StepCoefficients):
        raise TypeError("coefs must be a StepCoefficients; build it with mmtts.kernels.ddim_coefficients, "
                        "ddpm_coefficients or flow_match_coefficients")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; the denoising step takes float32, float16 or bfloat16")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have a leading candidate dimension of size >= 1, got shape {tuple(x.shape)}")
    for name, t in (("model_output", out), ("z", z)):
        if t is None:
            continue
        if t.shape != x.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but x has {tuple(x.shape)}; they must match")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; pass a float32, float16 or bfloat16 tensor")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
    batch = x.shape[0]
    for name, t in zip(StepCoefficients._fields, coefs):
        if not torch.is_tensor(t) or t.shape != (batch,):
            shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"coefficient {name} must be a tensor of shape ({batch},), one per candidate; got {shape}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"coefficient {name} has dtype {t.dtype}; coefficients are floats")


def denoise_step_reference(x, out, coefs: StepCoefficients, z=None, seed=None, offset=None, return_x0=True):
    """Pure-torch step in float32, cast back to ``x.dtype``; the definition the kernel is tested against."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    a, b, c, x0_a, x0_b = (t.to(device=x.device, dtype=torch.float32).reshape(shape) for t in coefs)
    xf, of = x.float(), out.float()
    x_next = a * xf + b * of
    if z is not None:
        x_next = x_next + c * z.float()
    elif seed is not None:
        seed, offset = check_seed_offset(seed, offset, x.shape[0], x.device)
        noise = philox_normal_reference(seed, offset, x[0].numel()).reshape(x.shape)
        x_next = x_next + c * noise
    x0 = (x0_a * xf + x0_b * of).to(x.dtype) if return_x0 else None
    return x_next.to(x.dtype), x0


def denoise_step(x: torch.Tensor, model_output: torch.Tensor, coefs: StepCoefficients, z: torch.Tensor | None = None,
                 seed=None, offset=None, return_x0: bool = True):
    """Advance a batch of candidates one sampler step; returns ``(x_next, x0)`` in ``x.dtype``.

    ``x`` and ``model_output`` have shape (B, ...). Noise: pass ``z`` (same
    shape), or per-candidate ``seed`` and ``offset`` int64 tensors of shape (B,)
    (``streams.seeds`` and ``streams.counters``; advance the counters by one
    afterwards) to draw it in the kernel, or neither for a deterministic step
    (then ``c`` is ignored). ``x0`` is None when ``return_x0`` is False.
    """
    _check(x, model_output, coefs, z)
    if z is not None and seed is not None:
        raise ValueError("pass either z (the noise itself) or seed/offset (to draw it), not both")
    if seed is None and offset is not None:
        raise ValueError("offset without seed: pass seed=streams.seeds with offset=streams.counters")
    if z is None and seed is not None:
        seed, offset = check_seed_offset(seed, offset, x.shape[0], x.device)
    if use_triton(x, model_output):
        from .denoise_triton import denoise_step_triton

        return denoise_step_triton(x, model_output, coefs, z, seed, offset, return_x0)
    return denoise_step_reference(x, model_output, coefs, z, seed, offset, return_x0)
