"""One fused denoising step over a population of candidates: the definition every device runs.

Every first-order sampler step the image Process takes (DDIM with any eta,
DDPM, flow-matching Euler with or without fresh noise) is, per candidate, an
affine map of the current sample ``x``, the model output and fresh noise ``z``,
corrected where the sampler clips its x0 prediction::

    x0     = x0_a * x + x0_b * out                      (the preview verifiers score)
    x_next = a * x + b * out + c * z                     (no clipping)
    x_next = a * x + b * out + c * z + d * clip(x0)      (x0 clipped to [-clip, clip])

with scalars per candidate, so candidates may sit at different timesteps.
Without clipping the x0 term is folded into ``a`` and ``b``; with it, ``d``
is x0's weight and ``a``, ``b`` the rest (the noise direction), so a large x0
is never added and then taken away. The
coefficients come from :mod:`mmtts.kernels.schedules` or from the image
Process's ``Schedule``; ``c`` is the sampler's own stochastic standard
deviation at that step. :func:`denoise_step` runs the Triton kernel on CUDA
tensors and :func:`denoise_step_reference` everywhere else, so this module
holds the only copy of the update. Fusing the step reads ``x`` and ``out``
once and writes both results in one pass; the noise is drawn in registers from
each candidate's (seed, offset) stream when ``z`` is not given.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .dispatch import use_triton
from .philox import check_seed_offset, philox_normal_reference

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class StepCoefficients(NamedTuple):
    """Per-candidate coefficients of one step, each a float tensor of shape (B,).

    Args:
        a, b, c: weights of ``x``, the model output and the fresh noise in ``x_next`` (besides ``d``'s x0 term).
        x0_a, x0_b: weights of ``x`` and the model output in the x0 prediction.
        d: weight of the clipped x0 in ``x_next``, only with ``clip``.
        clip: bound of the x0 prediction (``inf`` for no bound), or None when no candidate clips (then the x0
            term is part of ``a`` and ``b``).
    """

    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    x0_a: torch.Tensor
    x0_b: torch.Tensor
    d: torch.Tensor | None = None
    clip: torch.Tensor | None = None

    def _map(self, fn) -> "StepCoefficients":
        return StepCoefficients(*(None if t is None else fn(t) for t in self))

    def to(self, device) -> "StepCoefficients":
        """On ``device`` (same dtype: the builders give float64, which each step casts to its compute precision)."""
        return self._map(lambda t: t.to(device=device))

    def select(self, index: torch.Tensor) -> "StepCoefficients":
        """The coefficients of the candidates at ``index`` (to follow a State through resampling)."""
        return self._map(lambda t: t[index])

    @staticmethod
    def cat(items) -> "StepCoefficients":
        """Candidates of several coefficient sets, in order (all clip, or none does)."""
        items = list(items)
        if len({it.clip is None for it in items}) > 1:
            raise ValueError("cannot concatenate coefficients with and without clip; give every set clip "
                             "(inf where a candidate does not clip)")
        return StepCoefficients(*(None if ts[0] is None else torch.cat(ts) for ts in zip(*items)))


def _check(x, out, coefs, z):
    if not isinstance(coefs, StepCoefficients):
        raise TypeError("coefs must be a StepCoefficients; build it with mmtts.kernels.ddim_coefficients, "
                        "ddpm_coefficients or flow_match_coefficients")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; the denoising step takes float32, float16, bfloat16 or float64")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have a leading candidate dimension of size >= 1, got shape {tuple(x.shape)}")
    for name, t in (("model_output", out), ("z", z)):
        if t is None:
            continue
        if t.shape != x.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but x has {tuple(x.shape)}; they must match")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; pass a float32, float16, bfloat16 or float64 tensor")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
    batch = x.shape[0]
    if (coefs.clip is None) != (coefs.d is None):
        raise ValueError("clip and d go together: clip bounds x0 and d is its weight in x_next; pass both or neither")
    for name, t in zip(StepCoefficients._fields, coefs):
        if t is None:
            continue
        if not torch.is_tensor(t) or t.shape != (batch,):
            shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"coefficient {name} must be a tensor of shape ({batch},), one per candidate; got {shape}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"coefficient {name} has dtype {t.dtype}; coefficients are floats")


def denoise_step_reference(x, out, coefs: StepCoefficients, z=None, seed=None, offset=None, return_x0=True):
    """The step in pure torch, cast back to ``x.dtype``: what every non-CUDA device (and float64) runs.

    Computes in float32 (float64 for float64 inputs). Takes inputs
    :func:`denoise_step` has validated; the kernel computes the same
    expression in the same order.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    given = [t for t in coefs if t is not None]  # one conversion for all of them: (fields, B, 1, ...)
    cols = torch.stack(given).to(device=x.device, dtype=dtype).view((len(given), -1) + (1,) * (x.dim() - 1))
    a, b, c, x0_a, x0_b, d, clip = list(cols.unbind(0)) + [None] * (len(coefs) - len(given))
    xf, of = x.to(dtype), out.to(dtype)
    x_next = torch.addcmul(a * xf, b, of)
    if z is None and seed is not None:
        z = philox_normal_reference(seed.to(x.device), offset.to(x.device), x[0].numel()).reshape(x.shape)
    if z is not None:
        x_next = torch.addcmul(x_next, c, z.to(dtype))
    x0 = None
    if return_x0 or clip is not None:
        x0 = torch.addcmul(x0_a * xf, x0_b, of)
    if clip is not None:
        x0 = torch.minimum(torch.maximum(x0, -clip), clip)
        x_next = torch.addcmul(x_next, d, x0)
    return x_next.to(x.dtype), (x0.to(x.dtype) if return_x0 else None)


def denoise_step(x: torch.Tensor, model_output: torch.Tensor, coefs: StepCoefficients, z: torch.Tensor | None = None,
                 seed=None, offset=None, return_x0: bool = True):
    """Advance a batch of candidates one sampler step; returns ``(x_next, x0)`` in ``x.dtype``.

    ``x`` and ``model_output`` have shape (B, ...). Noise: pass ``z`` (same
    shape, e.g. ``streams.randn``), or per-candidate ``seed`` and ``offset``
    int64 tensors of shape (B,) (``streams.seeds`` and ``streams.counters``:
    the noise ``streams.randn`` would return next, drawn in registers) or neither for a deterministic step (then
    ``c`` is ignored). ``x0`` is the clipped prediction when ``coefs.clip`` is
    set, and None when ``return_x0`` is False. CUDA tensors run the Triton
    kernel (float32 arithmetic), all others and float64 inputs
    :func:`denoise_step_reference`.
    """
    _check(x, model_output, coefs, z)
    if z is not None and seed is not None:
        raise ValueError("pass either z (the noise itself) or seed/offset (to draw it), not both")
    if seed is None and offset is not None:
        raise ValueError("offset without seed: pass seed=streams.seeds with offset=streams.counters")
    if z is None and seed is not None:
        seed, offset = check_seed_offset(seed, offset, x.shape[0], x.device)
    if x.dtype != torch.float64 and use_triton(x, model_output):
        from .denoise_triton import denoise_step_triton

        return denoise_step_triton(x, model_output, coefs, z, seed, offset, return_x0)
    return denoise_step_reference(x, model_output, coefs, z, seed, offset, return_x0)
