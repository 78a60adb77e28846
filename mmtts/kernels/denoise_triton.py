"""Triton kernel and launcher for :func:`mmtts.kernels.denoise.denoise_step`.

Grid: (blocks along a candidate, candidates). A program loads its
candidate's coefficients once, streams ``x`` and the model output as
(quads, 4) tiles in float32, adds ``c * z`` with ``z`` loaded or drawn by
Philox, adds the clipped x0 term (weight 0 and bound inf when the
coefficients do not clip), and stores ``x_next`` and ``x0`` in the input dtype: the
expression and order of :func:`mmtts.kernels.denoise.denoise_step_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import interpreting
from .philox_triton import normal_block

if interpreting():  # the interpreter has no autotuning: one large block keeps the program count low
    _CONFIGS = [triton.Config({"QUADS": 1024}, num_warps=4)]
else:
    _CONFIGS = [triton.Config({"QUADS": q}, num_warps=w) for q, w in ((256, 4), (512, 4), (1024, 8), (2048, 8))]


@triton.autotune(configs=_CONFIGS, key=["numel", "HAS_Z", "DRAW_Z", "WRITE_X0"])
@triton.jit
def _denoise_kernel(x_ptr, out_ptr, z_ptr, seed_ptr, offset_ptr, coef_ptr, next_ptr, x0_ptr, numel, batch,
                    HAS_Z: tl.constexpr, DRAW_Z: tl.constexpr, WRITE_X0: tl.constexpr, QUADS: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    quad = pid.to(tl.int64) * QUADS + tl.arange(0, QUADS)
    idx = quad[:, None] * 4 + tl.arange(0, 4)[None, :]
    mask = idx < numel
    base = b * numel
    a = tl.load(coef_ptr + b)
    cb = tl.load(coef_ptr + batch + b)
    x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(out_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
    x_next = a * x + cb * out
    if HAS_Z:
        cc = tl.load(coef_ptr + 2 * batch + b)
        z = tl.load(z_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        x_next += cc * z
    if DRAW_Z:
        cc = tl.load(coef_ptr + 2 * batch + b)
        x_next += cc * normal_block(tl.load(seed_ptr + b), tl.load(offset_ptr + b), quad)
    # the clipped x0 term: weight 0 and bound inf without clipping (a few flops: the kernel is memory-bound)
    x0_a = tl.load(coef_ptr + 3 * batch + b)
    x0_b = tl.load(coef_ptr + 4 * batch + b)
    cd = tl.load(coef_ptr + 5 * batch + b)
    bound = tl.load(coef_ptr + 6 * batch + b)
    clipped = tl.minimum(tl.maximum(x0_a * x + x0_b * out, -bound), bound)
    x_next += cd * clipped
    if WRITE_X0:
        tl.store(x0_ptr + base + idx, clipped.to(x0_ptr.dtype.element_ty), mask=mask)
    tl.store(next_ptr + base + idx, x_next.to(next_ptr.dtype.element_ty), mask=mask)


def denoise_step_triton(x, out, coefs, z, seed, offset, return_x0):
    """Launch the fused step on inputs already validated by :func:`mmtts.kernels.denoise.denoise_step`."""
    batch = x.shape[0]
    numel = x[0].numel()
    if numel >= 4 * 2**32:
        raise ValueError(f"a candidate has {numel} elements; the in-kernel noise counter covers at most 2**34")
    if batch > 65535:
        raise ValueError(f"{batch} candidates in one call; the kernel's grid takes at most 65535: split the batch")
    x, out = x.contiguous(), out.contiguous()
    z = None if z is None else z.contiguous()
    draw = z is None and seed is not None
    rows = list(coefs[:5])
    if coefs.clip is None:  # no clipping: weight 0, bound inf
        rows += [torch.zeros_like(coefs.a), torch.full_like(coefs.a, float("inf"))]
    else:
        rows += [coefs.d, coefs.clip]
    coef = torch.stack([t.to(torch.float32) for t in rows]).to(x.device).contiguous()  # one copy to the device
    x_next = torch.empty_like(x)
    x0 = torch.empty_like(x) if return_x0 else x_next
    dummy = coef
    grid = lambda meta: (triton.cdiv(numel, 4 * meta["QUADS"]), batch)  # noqa: E731
    _denoise_kernel[grid](x, out, dummy if z is None else z, seed if draw else dummy, offset if draw else dummy,
                          coef, x_next, x0, numel, batch,
                          HAS_Z=z is not None, DRAW_Z=draw, WRITE_X0=return_x0)
    return x_next, (x0 if return_x0 else None)
