"""Triton kernels and launchers for per-channel normalization over (N, C, *spatial) tensors.

Four kernels cover the forward and backward of batch normalization:

- ``_stats_kernel``: per (channel, chunk) program, Welford's update per lane
  and Chan's merge across lanes, in float32. One read of ``x``.
  ``_finalize_kernel`` then merges the chunks of each channel the same way and,
  for batch norm, mixes in the source statistics and emits scale and shift, so
  a training-mode forward is three launches whatever the mixing.
- ``_grad_sums_kernel``: the two per-channel sums the backward needs,
  ``sum(dy)`` and ``sum(dy * xhat)``. One read of ``dy`` and ``x``.
  ``_backward_coefficients_kernel`` merges the chunks and emits dw, db and
  the per-channel factors of dx, so the backward is three launches too.
- ``_channel_affine_kernel``: ``out = u*p[c] + v*q[c] + r[c]`` elementwise, which
  is normalize + affine (``v`` absent) and the input gradient.

Spatial dimensions are flattened: a contiguous (N, C, L) view is N*C rows of
length L, and channel ``c`` owns rows ``n*C + c``. Kernels work on 2-D tiles
of (rows, L) so that no per-element integer division is needed; a tile is
``BLOCK_L = min(next_pow2(L), BLOCK)`` wide, so L = 1 (BatchNorm1d) and large
images both fill it. Statistics programs split a channel's rows into chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import interpreting

if interpreting():  # few, large programs run fastest in the interpreter
    _BLOCK, _TARGET_PROGRAMS = 1024, 8
    _FINALIZE_TILE = 4  # small tiles so that the tests cover several chunks and several channel blocks
else:
    _BLOCK, _TARGET_PROGRAMS, _FINALIZE_TILE = 2048, 1024, 4096
_EW_BLOCK = 4096


def _tile(length: int, block: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_L): a tile of ``block`` elements, as wide as the rows allow."""
    block_l = min(triton.next_power_of_2(length), block)
    return block // block_l, block_l


def _split(x: torch.Tensor):
    """Contiguous (N, C, L) view and the chunking of each channel's N rows over programs."""
    x3 = x.contiguous().reshape(x.shape[0], x.shape[1], -1)
    n, c, length = x3.shape
    rows_per_chunk = triton.cdiv(n, max(1, min(triton.cdiv(_TARGET_PROGRAMS, c), n)))
    return x3, n, c, length, triton.cdiv(n, rows_per_chunk), rows_per_chunk


@triton.jit
def _chunk_rows(N, rows_per_chunk):
    """This program's channel c and chunk s, and the rows [n_start, n_end) of the chunk."""
    c = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    n_start = s * rows_per_chunk
    return c, s, n_start, tl.minimum(n_start + rows_per_chunk, N)


@triton.jit
def _tile_offsets(n0, l0, n_end, c, C, L, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """Offsets and mask of the (BLOCK_R, BLOCK_L) tile of channel c at row n0, column l0 of an (N, C, L) tensor."""
    n = n0 + tl.arange(0, BLOCK_R).to(tl.int64)
    col = l0 + tl.arange(0, BLOCK_L)
    return ((n * C + c) * L)[:, None] + col[None, :], (n < n_end)[:, None] & (col < L)[None, :]


@triton.jit
def _stats_kernel(x_ptr, mean_ptr, m2_ptr, N, C, L, rows_per_chunk, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """Welford per lane over one chunk of a channel's rows, then Chan's merge across lanes: (mean, M2)."""
    c, s, n_start, n_end = _chunk_rows(N, rows_per_chunk)
    count = tl.zeros((BLOCK_R, BLOCK_L), tl.float32)
    mean = tl.zeros((BLOCK_R, BLOCK_L), tl.float32)
    m2 = tl.zeros((BLOCK_R, BLOCK_L), tl.float32)
    for n0 in range(n_start, n_end, BLOCK_R):
        for l0 in range(0, L, BLOCK_L):
            offs, mask = _tile_offsets(n0, l0, n_end, c, C, L, BLOCK_R, BLOCK_L)
            v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            count += mask.to(tl.float32)
            delta = tl.where(mask, v - mean, 0.0)
            mean += delta / tl.maximum(count, 1.0)
            m2 += delta * tl.where(mask, v - mean, 0.0)
    n_total = tl.sum(tl.sum(count, axis=1), axis=0)
    chunk_mean = tl.sum(tl.sum(count * mean, axis=1), axis=0) / n_total
    d = mean - chunk_mean
    chunk_m2 = tl.sum(tl.sum(m2 + count * d * d, axis=1), axis=0)
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


def _stats_and_coefficients(x, weight=None, bias=None, src_mean=None, src_var=None, alpha=0.0, exact=False, eps=0.0):
    """Two launches: chunk partials of ``x``, then per-channel merge (+ mixing, scale and shift when affine)."""
    x3, n, c, length, chunks, rows_per_chunk = _split(x)
    pmean = torch.empty((c, chunks), device=x.device, dtype=torch.float32)
    pm2 = torch.empty_like(pmean)
    block_r, block_l = _tile(length, _BLOCK)
    _stats_kernel[(c, chunks)](x3, pmean, pm2, n, c, length, rows_per_chunk, BLOCK_R=block_r, BLOCK_L=block_l)
    total, chunk = n * length, rows_per_chunk * length
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
def _grad_sums_kernel(dy_ptr, x_ptr, mean_ptr, rstd_ptr, sdy_ptr, sdyx_ptr, N, C, L, rows_per_chunk,
                      BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    c, s, n_start, n_end = _chunk_rows(N, rows_per_chunk)
    mu = tl.load(mean_ptr + c)
    rstd = tl.load(rstd_ptr + c)
    acc_dy = tl.zeros((BLOCK_R, BLOCK_L), tl.float32)
    acc_dyx = tl.zeros((BLOCK_R, BLOCK_L), tl.float32)
    for n0 in range(n_start, n_end, BLOCK_R):
        for l0 in range(0, L, BLOCK_L):
            offs, mask = _tile_offsets(n0, l0, n_end, c, C, L, BLOCK_R, BLOCK_L)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            acc_dy += dy
            acc_dyx += tl.where(mask, dy * (x - mu) * rstd, 0.0)
    nchunks = tl.num_programs(1)
    tl.store(sdy_ptr + c * nchunks + s, tl.sum(tl.sum(acc_dy, axis=1), axis=0))
    tl.store(sdyx_ptr + c * nchunks + s, tl.sum(tl.sum(acc_dyx, axis=1), axis=0))


@triton.jit
def _backward_coefficients_kernel(sdy_ptr, sdyx_ptr, w_ptr, rstd_ptr, bmean_ptr, smean_ptr, db_ptr, dw_ptr, p_ptr,
                                  q_ptr, r_ptr, C, nchunks, count, alpha, USE_BATCH: tl.constexpr,
                                  EXACT_MIX: tl.constexpr, BLOCK_C: tl.constexpr, CHUNKS: tl.constexpr):
    """Sum the chunk partials and turn them into dw, db and dx = dy*p[c] + x*q[c] + r[c] (see _BatchNorm)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.arange(0, CHUNKS)
    cmask = c < C
    both = cmask[:, None] & (s < nchunks)[None, :]
    at = c[:, None] * nchunks + s[None, :]
    sum_dy = tl.sum(tl.load(sdy_ptr + at, mask=both, other=0.0), axis=1)
    sum_dyx = tl.sum(tl.load(sdyx_ptr + at, mask=both, other=0.0), axis=1)
    w = tl.load(w_ptr + c, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + c, mask=cmask, other=0.0)
    tl.store(db_ptr + c, sum_dy, mask=cmask)
    tl.store(dw_ptr + c, sum_dyx, mask=cmask)
    tl.store(p_ptr + c, w * rstd, mask=cmask)
    k = tl.zeros_like(w)
    r = tl.zeros_like(w)
    if USE_BATCH:
        d_mean = -rstd * w * sum_dy
        d_var = -0.5 * rstd * rstd * w * sum_dyx
        bmean = tl.load(bmean_ptr + c, mask=cmask, other=0.0)
        d_bmean = (1 - alpha) * d_mean
        if EXACT_MIX:
            d_bmean -= 2 * alpha * (1 - alpha) * (tl.load(smean_ptr + c, mask=cmask, other=0.0) - bmean) * d_var
        k = 2 * (1 - alpha) * d_var / count
        r = d_bmean / count - k * bmean
    tl.store(q_ptr + c, k, mask=cmask)
    tl.store(r_ptr + c, r, mask=cmask)


def batch_norm_backward(dy, x, weight, mean, rstd, batch_mean, src_mean, alpha: float, use_batch: bool):
    """(dx, dw, db) of the batch-norm forward in three launches: partial sums, coefficients, elementwise dx."""
    x3, n, c, length, chunks, rows_per_chunk = _split(x)
    dy3 = dy.contiguous().reshape(x3.shape)
    partials = torch.empty((2, c, chunks), device=x.device, dtype=torch.float32)
    block_r, block_l = _tile(length, _BLOCK)
    _grad_sums_kernel[(c, chunks)](dy3, x3, mean.float().contiguous(), rstd.float().contiguous(), partials[0],
                                   partials[1], n, c, length, rows_per_chunk, BLOCK_R=block_r, BLOCK_L=block_l)
    out = torch.empty((5, c), device=x.device, dtype=torch.float32)
    exact_mix = use_batch and src_mean is not None
    chunks_p2 = triton.next_power_of_2(chunks)
    block_c = max(1, min(triton.next_power_of_2(c), _FINALIZE_TILE // chunks_p2))
    _backward_coefficients_kernel[(triton.cdiv(c, block_c),)](
        partials[0], partials[1], weight.float().contiguous(), rstd.float().contiguous(),
        batch_mean.float().contiguous() if use_batch else rstd, src_mean.float().contiguous() if exact_mix else rstd,
        *out, c, chunks, float(n * length), float(alpha), USE_BATCH=use_batch, EXACT_MIX=exact_mix,
        BLOCK_C=block_c, CHUNKS=chunks_p2)
    db, dw, p, q, r = out
    dx = channel_affine(dy3, p, r, x3 if use_batch else None, q if use_batch else None).reshape(x.shape)
    return dx, dw, db


@triton.jit
def _channel_affine_kernel(u_ptr, v_ptr, p_ptr, q_ptr, r_ptr, out_ptr, R, C, L, HAS_V: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = (rows % C)[:, None]
    at = (rows.to(tl.int64) * L)[:, None] + col[None, :]
    mask = (rows < R)[:, None] & (col < L)[None, :]
    out = tl.load(u_ptr + at, mask=mask, other=0.0).to(tl.float32) * tl.load(p_ptr + c, mask=rows[:, None] < R)
    out += tl.load(r_ptr + c, mask=rows[:, None] < R)
    if HAS_V:
        v = tl.load(v_ptr + at, mask=mask, other=0.0).to(tl.float32)
        out += v * tl.load(q_ptr + c, mask=rows[:, None] < R)
    tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=mask)


def channel_affine(u: torch.Tensor, p: torch.Tensor, r: torch.Tensor, v: torch.Tensor | None = None,
                   q: torch.Tensor | None = None) -> torch.Tensor:
    """``u*p[c] + v*q[c] + r[c]`` over (N, C, *spatial), per-channel factors in float32, output in ``u.dtype``."""
    u = u.contiguous()
    c = u.shape[1]
    length = u[0, 0].numel()
    rows = u.numel() // length
    if rows >= 2**31:
        raise ValueError(f"{rows} (sample, channel) rows exceed the kernel's int32 row index; split the batch")
    out = torch.empty_like(u)
    p, r = p.float().contiguous(), r.float().contiguous()
    has_v = v is not None
    v = v.contiguous() if has_v else u
    q = q.float().contiguous() if has_v else p
    block_r, block_l = _tile(length, _EW_BLOCK)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(length, block_l))
    _channel_affine_kernel[grid](u, v, p, q, r, out, rows, c, length, HAS_V=has_v, BLOCK_R=block_r, BLOCK_L=block_l,
                                 num_warps=8)
    return out
