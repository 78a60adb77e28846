"""In-register Philox normals for Triton kernels, and a kernel that only draws noise.

Mirrors :mod:`mmtts.kernels.philox` word for word (same key, counters,
uniform mapping and Box-Muller), so the kernel and the reference agree to
float32 rounding of log/sin/cos. Kernels lay a block out as (quads, 4):
row ``j`` is one Philox call, column ``k`` one of its four normals, which keeps
the noise of an element independent of the block size.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .dispatch import interpreting

_TWO_PI = tl.constexpr(2.0 * math.pi)
_INV_2_24 = tl.constexpr(1.0 / 16777216.0)


@triton.jit
def _uniform(w):
    return ((w >> 8).to(tl.float32) + 0.5) * _INV_2_24


@triton.jit
def normal_block(seed, offset, quad):
    """Normals of shape (QUADS, 4) for one candidate: ``seed``/``offset`` int64 scalars, ``quad`` int64 (QUADS,)."""
    c0 = quad.to(tl.uint32)
    zero = tl.zeros_like(c0)
    c1 = zero + (offset & 0xFFFFFFFF).to(tl.uint32)
    c2 = zero + ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, zero)
    r01 = tl.sqrt(-2.0 * tl.log(_uniform(w0)))
    t01 = _TWO_PI * _uniform(w1)
    r23 = tl.sqrt(-2.0 * tl.log(_uniform(w2)))
    t23 = _TWO_PI * _uniform(w3)
    col = tl.arange(0, 4)[None, :]
    n0 = (r01 * tl.cos(t01))[:, None]
    n1 = (r01 * tl.sin(t01))[:, None]
    n2 = (r23 * tl.cos(t23))[:, None]
    n3 = (r23 * tl.sin(t23))[:, None]
    return tl.where(col == 0, n0, tl.where(col == 1, n1, tl.where(col == 2, n2, n3)))


@triton.jit
def _noise_kernel(out_ptr, seed_ptr, offset_ptr, numel, QUADS: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    quad = pid.to(tl.int64) * QUADS + tl.arange(0, QUADS)
    idx = quad[:, None] * 4 + tl.arange(0, 4)[None, :]
    z = normal_block(tl.load(seed_ptr + b), tl.load(offset_ptr + b), quad)
    tl.store(out_ptr + b * numel + idx, z, mask=idx < numel)


def philox_normal(seed: torch.Tensor, offset: torch.Tensor, numel: int) -> torch.Tensor:
    """Kernel counterpart of :func:`mmtts.kernels.philox.philox_normal_reference`: (B, numel) float32."""
    out = torch.empty((seed.shape[0], numel), device=seed.device, dtype=torch.float32)
    quads = 1024 if interpreting() else 256
    grid = (triton.cdiv(numel, 4 * quads), seed.shape[0])
    _noise_kernel[grid](out, seed, offset, numel, QUADS=quads)
    return out
