"""Triton kernels and launchers for per-channel normalization over (N, C, *spatial) tensors.

Three main kernels cover the forward and backward of batch normalization:

- ``_stats_kernel``: per (channel, chunk) program, Welford's update per lane
  and Chan's merge across lanes, in float32. One read of ``x``.
  ``_finalize_kernel`` then merges the chunks of each channel the same way and,
  for batch norm, mixes in the source statistics and emits scale and shift, so
  a training-mode forward is three launches whatever the mixing.
- ``_grad_sums_kernel``: the two per-channel sums the backward needs,
  ``sum(dy)`` and ``sum(dy * xhat)``. One read of ``dy`` and ``x``.
- ``_channel_affine_kernel``: ``out = u*p[c] + v*q[c] + r[c]`` elementwise, which
  is normalize + affine (``v`` absent) and the input gradient.

Spatial dimensions are flattened: channel ``c`` of a contiguous (N, C, L)
view holds the values at ``n*C*L + c*L + l``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import interpreting

if interpreting():  # no autotuning in the interpreter, and few large programs run fastest there
    _REDUCE_BLOCK, _EW_CONFIGS, _TARGET_PROGRAMS = 1024, [triton.Config({"BLOCK": 4096}, num_warps=4)], 8
    _FINALIZE_TILE = 4  # small tiles so that the tests cover several chunks and several channel blocks
else:
    _REDUCE_BLOCK, _TARGET_PROGRAMS, _FINALIZE_TILE = 2048, 1024, 4096
    _EW_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((1024, 4), (2048, 8), (4096, 8))]


def _split(x: torch.Tensor):
    """Contiguous (N, C, L) view and the chunking of each channel's N*L values over programs."""
    x3 = x.contiguous().reshape(x.shape[0], x.shape[1], -1)
    n, c, length = x3.shape
    total = n * length
    chunks = max(1, min(triton.cdiv(_TARGET_PROGRAMS, c), triton.cdiv(total, _REDUCE_BLOCK)))
    chunk = triton.cdiv(triton.cdiv(total, chunks), _REDUCE_BLOCK) * _REDUCE_BLOCK
    return x3, c, length, total, triton.cdiv(total, chunk), chunk


@triton.jit
def _stats_kernel(x_ptr, mean_ptr, m2_ptr, C, L, total, chunk, BLOCK: tl.constexpr):
    """Welford per lane over the chunk, then Chan's merge across the lanes: (mean, M2) of one chunk."""
    c = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    start = s * chunk
    end = tl.minimum(start + chunk, total)
    count = tl.zeros((BLOCK,), tl.float32)
    mean = tl.zeros((BLOCK,), tl.float32)
    m2 = tl.zeros((BLOCK,), tl.float32)
    for off in range(start, end, BLOCK):
        i = off + tl.arange(0, BLOCK).to(tl.int64)
        mask = i < end
        v = tl.load(x_ptr + (i // L) * C * L + c * L + i % L, mask=mask, other=0.0).to(tl.float32)
        count += mask.to(tl.float32)
        delta = tl.where(mask, v - mean, 0.0)
        mean += delta / tl.maximum(count, 1.0)
        m2 += delta * tl.where(mask, v - mean, 0.0)
    n = tl.sum(count, axis=0)
    chunk_mean = tl.sum(count * mean, axis=0) / n
    d = mean - chunk_mean
    chunk_m2 = tl.sum(m2, axis=0) + tl.sum(count * d * d, axis=0)
    nchunks = tl.num_programs(1)
    tl.store(mean_ptr + c * nchunks + s, chunk_mean)
    tl.store(m2_ptr + c * nchunks + s, chunk_m2)


@triton.jit
def _finalize_kernel(pmean_ptr, pm2_ptr, smean_ptr, svar_ptr, w_ptr, b_ptr, bmean_ptr, bvar_ptr, mean_ptr, rstd_ptr,
                     scale_ptr, shift_ptr, C, total, chunk, nchunks, alpha, eps, MIX: tl.constexpr,
                     EXACT: tl.constexpr, AFFINE: tl.constexpr, BLOCK_C: tl.constexpr, CHUNKS: tl.constexpr):
    """Merge the chunk partials per channel, mix with the source, and emit the normalization's scale and shift."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.arange(0, CHUNKS)
    cmask = c < C
    smask = s < nchunks
    at = c[:, None] * nchunks + s[None, :]
    both = cmask[:, None] & smask[None, :]
    pmean = tl.load(pmean_ptr + at, mask=both, other=0.0)
    pm2 = tl.load(pm2_ptr + at, mask=both, other=0.0)
    count = tl.where(smask, tl.minimum(total - s.to(tl.int64) * chunk, chunk), 0).to(tl.float32)[None, :]
    bmean = tl.sum(pmean * count, axis=1) / total
    d = tl.where(both, pmean - bmean[:, None], 0.0)
    bvar = (tl.sum(pm2, axis=1) + tl.sum(count * d * d, axis=1)) / total
    tl.store(bmean_ptr + c, bmean, mask=cmask)
    tl.store(bvar_ptr + c, bvar, mask=cmask)
    if AFFINE:
        mean = bmean
        var = bvar
        if MIX:
            src_mean = tl.load(smean_ptr + c, mask=cmask, other=0.0).to(tl.float32)
            src_var = tl.load(svar_ptr + c, mask=cmask, other=1.0).to(tl.float32)
            mean = alpha * src_mean + (1 - alpha) * bmean
            var = alpha * src_var + (1 - alpha) * bvar
            if EXACT:
                var += alpha * (1 - alpha) * (src_mean - bmean) * (src_mean - bmean)
        rstd = tl.rsqrt(var + eps)
        scale = tl.load(w_ptr + c, mask=cmask, other=1.0).to(tl.float32) * rstd
        tl.store(mean_ptr + c, mean, mask=cmask)
        tl.store(rstd_ptr + c, rstd, mask=cmask)
        tl.store(scale_ptr + c, scale, mask=cmask)
        tl.store(shift_ptr + c, tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32) - mean * scale, mask=cmask)


def _stats_and_coefficients(x, weight=None, bias=None, src_mean=None, src_var=None, alpha=0.0, exact=True, eps=0.0):
    """Two launches: chunk partials of ``x``, then per-channel merge (+ mixing, scale and shift when affine)."""
    x3, c, length, total, chunks, chunk = _split(x)
    pmean = torch.empty((c, chunks), device=x.device, dtype=torch.float32)
    pm2 = torch.empty_like(pmean)
    _stats_kernel[(c, chunks)](x3, pmean, pm2, c, length, total, chunk, BLOCK=_REDUCE_BLOCK)
    out = torch.empty((6, c), device=x.device, dtype=torch.float32)
    affine = weight is not None
    mix = affine and alpha > 0
    chunks_p2 = triton.next_power_of_2(chunks)
    block_c = max(1, min(triton.next_power_of_2(c), _FINALIZE_TILE // chunks_p2))
    _finalize_kernel[(triton.cdiv(c, block_c),)](
        pmean, pm2, src_mean if mix else pmean, src_var if mix else pmean, weight if affine else pmean,
        bias if affine else pmean, *out, c, total, chunk, chunks, float(alpha), float(eps),
        MIX=mix, EXACT=bool(exact), AFFINE=affine, BLOCK_C=block_c, CHUNKS=chunks_p2)
    return x3, out


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel float32 mean and biased variance of ``x`` (N, C, *spatial)."""
    _, out = _stats_and_coefficients(x)
    return out[0], out[1]


def batch_norm_forward(x, weight, bias, src_mean, src_var, alpha: float, exact: bool, eps: float):
    """Training-mode forward in three launches; returns y and the float32 batch mean, batch var, mean and rstd."""
    x3, out = _stats_and_coefficients(x, weight.float().contiguous(), bias.float().contiguous(),
                                      None if src_mean is None else src_mean.float().contiguous(),
                                      None if src_var is None else src_var.float().contiguous(), alpha, exact, eps)
    y = channel_affine(x3, out[4], out[5]).reshape(x.shape)
    return y, out[0], out[1], out[2], out[3]


@triton.jit
def _grad_sums_kernel(dy_ptr, x_ptr, mean_ptr, rstd_ptr, sdy_ptr, sdyx_ptr, C, L, total, chunk,
                      BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    start = s * chunk
    end = tl.minimum(start + chunk, total)
    mu = tl.load(mean_ptr + c)
    rstd = tl.load(rstd_ptr + c)
    acc_dy = tl.zeros((BLOCK,), tl.float32)
    acc_dyx = tl.zeros((BLOCK,), tl.float32)
    for off in range(start, end, BLOCK):
        i = off + tl.arange(0, BLOCK).to(tl.int64)
        mask = i < end
        at = (i // L) * C * L + c * L + i % L
        dy = tl.load(dy_ptr + at, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        acc_dy += dy
        acc_dyx += tl.where(mask, dy * (x - mu) * rstd, 0.0)
    nchunks = tl.num_programs(1)
    tl.store(sdy_ptr + c * nchunks + s, tl.sum(acc_dy, axis=0))
    tl.store(sdyx_ptr + c * nchunks + s, tl.sum(acc_dyx, axis=0))


def grad_sums(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean) * rstd)`` in float32."""
    x3, c, length, total, chunks, chunk = _split(x)
    dy3 = dy.contiguous().reshape(x3.shape)
    sdy = torch.empty((c, chunks), device=x.device, dtype=torch.float32)
    sdyx = torch.empty_like(sdy)
    _grad_sums_kernel[(c, chunks)](dy3, x3, mean.float().contiguous(), rstd.float().contiguous(), sdy, sdyx,
                                   c, length, total, chunk, BLOCK=_REDUCE_BLOCK)
    return sdy.sum(dim=1), sdyx.sum(dim=1)


@triton.autotune(configs=_EW_CONFIGS, key=["numel", "HAS_V"])
@triton.jit
def _channel_affine_kernel(u_ptr, v_ptr, p_ptr, q_ptr, r_ptr, out_ptr, numel, C, L, HAS_V: tl.constexpr,
                           BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    c = (i // L) % C
    out = tl.load(u_ptr + i, mask=mask, other=0.0).to(tl.float32) * tl.load(p_ptr + c, mask=mask, other=0.0)
    out += tl.load(r_ptr + c, mask=mask, other=0.0)
    if HAS_V:
        v = tl.load(v_ptr + i, mask=mask, other=0.0).to(tl.float32)
        out += v * tl.load(q_ptr + c, mask=mask, other=0.0)
    tl.store(out_ptr + i, out.to(out_ptr.dtype.element_ty), mask=mask)


def channel_affine(u: torch.Tensor, p: torch.Tensor, r: torch.Tensor, v: torch.Tensor | None = None,
                   q: torch.Tensor | None = None) -> torch.Tensor:
    """``u*p[c] + v*q[c] + r[c]`` over (N, C, *spatial), per-channel factors in float32, output in ``u.dtype``."""
    u = u.contiguous()
    c = u.shape[1]
    length = u[0, 0].numel()
    out = torch.empty_like(u)
    p, r = p.float().contiguous(), r.float().contiguous()
    has_v = v is not None
    v = v.contiguous() if has_v else u
    q = q.float().contiguous() if has_v else p
    grid = lambda meta: (triton.cdiv(u.numel(), meta["BLOCK"]),)  # noqa: E731
    _channel_affine_kernel[grid](u, v, p, q, r, out, u.numel(), c, length, HAS_V=has_v)
    return out
