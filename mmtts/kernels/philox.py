"""Per-candidate counter-based Gaussian noise: the pure-torch reference.

Candidate ``b`` owns a 64-bit ``seed[b]`` and a draw counter ``offset[b]``
(the ``(seed, counter)`` pair of :class:`mmtts.core.rng.Streams`). Element
``i`` of its noise comes from one Philox-4x32-10 block (Salmon et al., 2011)
keyed by the seed, with counter words ``(i // 4, offset low, offset high, 0)``;
the block's four 32-bit words become four normals by Box-Muller and element
``i`` takes word ``i % 4``. The noise is therefore a pure function of
(seed, offset, element index): independent of batch composition, block sizes
and device, which is what lets the Triton kernel draw it in registers and
still match this reference.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl increments of the key
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # round multipliers
ROUNDS = 10
_INV_2_24 = 1.0 / 16777216.0


def _mul_hi_lo(const: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``const * c`` for uint32 values held in int64 (no 64-bit overflow)."""
    p_lo = (const & 0xFFFF) * c  # < 2**48
    p_hi = (const >> 16) * c  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = ROUNDS):
    """Philox-4x32 on int64 tensors holding uint32 words; broadcasts like ordinary tensor arithmetic."""
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def words_to_uniform(w: torch.Tensor) -> torch.Tensor:
    """Top 24 bits of a uint32 word to a float32 in the open interval (0, 1), so log() never sees 0."""
    return ((w >> 8).to(torch.float32) + 0.5) * _INV_2_24


def _box_muller(u0: torch.Tensor, u1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    radius = torch.sqrt(-2.0 * torch.log(u0))
    theta = (2.0 * math.pi) * u1
    return radius * torch.cos(theta), radius * torch.sin(theta)


def philox_normal_reference(seed: torch.Tensor, offset: torch.Tensor, numel: int) -> torch.Tensor:
    """Standard normals of shape (B, numel) in float32 for per-candidate ``seed`` and ``offset`` of shape (B,)."""
    seed = seed.to(torch.int64).reshape(-1, 1)
    offset = offset.to(torch.int64).reshape(-1, 1)
    quads = (numel + 3) // 4
    j = torch.arange(quads, dtype=torch.int64, device=seed.device).reshape(1, -1)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    words = philox4x32(j, offset & _M32, (offset >> 32) & _M32, torch.zeros_like(j), k0, k1)
    n0, n1 = _box_muller(words_to_uniform(words[0]), words_to_uniform(words[1]))
    n2, n3 = _box_muller(words_to_uniform(words[2]), words_to_uniform(words[3]))
    return torch.stack([n0, n1, n2, n3], dim=-1).reshape(seed.shape[0], quads * 4)[:, :numel]


def check_seed_offset(seed, offset, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and normalize per-candidate seeds and offsets to int64 tensors of shape (batch,) on ``device``."""
    if seed is None:
        raise ValueError("in-kernel noise needs per-candidate seeds: pass seed=streams.seeds (shape (B,)) or give z")
    seed = torch.as_tensor(seed)
    offset = torch.zeros_like(seed) if offset is None else torch.as_tensor(offset)
    for name, t in (("seed", seed), ("offset", offset)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers (int64), got {t.dtype}; pass e.g. streams.seeds")
        if t.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},), one per candidate; got {tuple(t.shape)}")
    if bool((offset < 0).any()):
        raise ValueError("offset must be non-negative: it counts the draws a stream has made")
    return seed.to(device=device, dtype=torch.int64), offset.to(device=device, dtype=torch.int64)


def candidate_noise(seed, offset, shape: Sequence[int], device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Noise of shape (B, *shape), the same tensor the fused denoising step draws for these seeds and offsets.

    Use it wherever a candidate needs the step's noise outside the step (a
    mutation, a re-noise) so both come from one stream definition.
    """
    from .dispatch import use_triton

    device = torch.device(device)
    numel = math.prod(shape)
    probe = torch.empty(0, device=device)
    seed_t = torch.as_tensor(seed)
    seed_t, offset_t = check_seed_offset(seed_t, offset, seed_t.reshape(-1).shape[0], device)
    if use_triton(probe):
        from .philox_triton import philox_normal

        out = philox_normal(seed_t, offset_t, numel)
    else:
        out = philox_normal_reference(seed_t, offset_t, numel)
    return out.reshape(seed_t.shape[0], *shape).to(dtype)
