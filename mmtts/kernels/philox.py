"""Per-candidate counter-based random numbers: the reference, and what every non-CUDA device runs.

Candidate ``b`` owns a 64-bit ``seed[b]`` and a draw counter ``offset[b]``
(the ``(seed, counter)`` pair of :class:`mmtts.core.rng.Streams`). Element
``i`` of its noise comes from one Philox-4x32-10 block (Salmon et al., 2011)
keyed by the seed, with counter words ``(i // 4, offset low, offset high, 0)``;
the block's four 32-bit words become four normals by Box-Muller and element
``i`` takes word ``i % 4``. The noise is therefore a pure function of
(seed, offset, element index): independent of batch composition, block sizes
and device, which is what lets the Triton kernel draw it in registers and
still match this reference.

The reference is vectorized over candidates and elements and written with
integer operators only, so the one definition of the rounds runs on Python
integers, numpy uint64 arrays and torch int64 tensors alike. The CPU draws
its words as Python integers when there are a few blocks and as numpy arrays
otherwise: either costs a fraction of torch's fixed cost per operation on the
small arrays a search draws. Other devices run the same rounds on their
tensors. Every route gives the same words, bit for bit, and the uniform and
Box-Muller mapping after them is the same torch code everywhere.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl increments of the key
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # round multipliers
ROUNDS = 10
_INV_2_24 = 1.0 / 16777216.0
_INV_2_53 = 1.0 / 9007199254740992.0
_INTS = (_M32, _ROUND_A, _ROUND_B, 32)  # the constants for Python integers and torch tensors
_U64 = tuple(np.uint64(c) for c in _INTS)  # and for numpy's uint64 arrays, typed once
_PER_BLOCK_BELOW = 16  # measured: below this many blocks, Python integers beat numpy's fixed cost per operation


def _int64(t) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) and t.dtype == torch.int64 else torch.as_tensor(t, dtype=torch.int64)


def _rounds(c0, c1, c2, c3, k0, k1, mask, mul_a, mul_b, shift) -> tuple:
    """The ten Philox rounds on counter words ``c`` and key words ``k``, in integer operators only; returns the
    four output words. ``mask``, ``mul_a``, ``mul_b`` and ``shift`` are the constants in the words' own type.

    A 32x32-bit product is exact modulo 2**64, so its high word is a shift;
    words carry junk above bit 31 between rounds and are masked only before a
    product and at the end.
    """
    for i in range(ROUNDS):  # round i is keyed by (k0 + i A, k1 + i B)
        p0, p2 = (c0 & mask) * mul_a, (c2 & mask) * mul_b
        c0, c1, c2, c3 = (p2 >> shift) ^ c1 ^ (k0 + i * _KEY_A), p2, (p0 >> shift) ^ c3 ^ (k1 + i * _KEY_B), p0
    return c0 & mask, c1 & mask, c2 & mask, c3 & mask


def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 on integer words; broadcasts like ordinary array arithmetic.

    The words are numpy uint64 arrays, or torch int64 tensors or Python
    integers, holding uint32 values. Returns the four output words stacked
    into one array of shape (4, *broadcast shape): a uint64 numpy array when
    any word is a numpy array, an int64 tensor otherwise.
    """
    if any(isinstance(t, np.ndarray) for t in (c0, c1, c2, c3, k0, k1)):
        return np.stack(np.broadcast_arrays(*_rounds(c0, c1, c2, c3, k0, k1, *_U64)))
    words = _rounds(c0, c1, c2, c3, k0, k1, *_INTS)
    return torch.stack(torch.broadcast_tensors(*(_int64(w) for w in words)))


def words_to_uniform(w: torch.Tensor) -> torch.Tensor:
    """Top 24 bits of a uint32 word to a float32 in the open interval (0, 1), so log() never sees 0."""
    return ((w >> 8).to(torch.float32) + 0.5) * _INV_2_24


def _words(seed: torch.Tensor, offset: torch.Tensor, quads: int) -> torch.Tensor:
    """Philox output words (B, quads, 4), int64 on the seeds' device, for counters (j, offset low, offset high, 0),
    j < quads, keyed by the seed: row b, block j holds the block's four words in order.

    The same rounds, by the cheapest route: on the CPU, Python integers for a
    few blocks and numpy arrays for more; torch tensors on other devices. The
    words come out block-major, the layout of the noise itself, so the
    mapping to floats never transposes.
    """
    seed, offset = _int64(seed).reshape(-1, 1), _int64(offset).reshape(-1, 1)  # offsets are non-negative
    b = seed.shape[0]
    if seed.device.type != "cpu":
        j = torch.arange(quads, dtype=torch.int64, device=seed.device)
        words = _rounds(j, offset & _M32, offset >> 32, 0, seed & _M32, (seed >> 32) & _M32, *_INTS)
        return torch.stack(torch.broadcast_tensors(*words), dim=-1)
    if 0 < b * quads < _PER_BLOCK_BELOW:
        m = _M32
        blocks = [_rounds(j, o & m, o >> 32, 0, s & m, (s >> 32) & m, *_INTS)
                  for s, o in zip(seed.view(-1).tolist(), offset.view(-1).tolist()) for j in range(quads)]
        return torch.tensor(blocks, dtype=torch.int64).view(b, quads, 4)
    s, o = seed.numpy().view(np.uint64), offset.numpy().view(np.uint64)
    mask, shift = _U64[0], _U64[3]
    j = np.arange(quads, dtype=np.uint64)
    words = _rounds(j, o & mask, o >> shift, 0, s & mask, s >> shift, *_U64)
    return torch.from_numpy(np.stack(np.broadcast_arrays(*words), axis=-1).view(np.int64))


def philox_normal_reference(seed: torch.Tensor, offset: torch.Tensor, numel: int) -> torch.Tensor:
    """Standard normals of shape (B, numel) in float32 for per-candidate ``seed`` and ``offset`` of shape (B,)."""
    quads = (numel + 3) // 4
    u = words_to_uniform(_words(seed, offset, quads))  # (B, quads, 4)
    radius = torch.sqrt(-2.0 * torch.log(u[..., 0::2]))  # from words 0 and 2
    theta = (2.0 * math.pi) * u[..., 1::2]  # from words 1 and 3
    # element 4j + k: k = 0, 1 from words (0, 1), k = 2, 3 from words (2, 3): radius * (cos, sin)
    normals = torch.view_as_real(torch.polar(radius, theta))  # (B, quads, 2, 2)
    return normals.reshape(-1, quads * 4)[:, :numel]


def philox_uniform_reference(seed: torch.Tensor, offset: torch.Tensor, numel: int) -> torch.Tensor:
    """Uniform [0, 1) float64 draws of shape (B, numel), 53 random bits each, from the same counters.

    Element ``i`` takes words (0, 1) of block ``i // 2`` when ``i`` is even,
    words (2, 3) when odd: top 27 and 26 bits, as numpy's ``random()`` does.
    """
    pairs = (numel + 1) // 2
    w = _words(seed, offset, pairs)  # (B, pairs, 4)
    hi, lo = (w[..., 0::2] >> 5).to(torch.float64), (w[..., 1::2] >> 6).to(torch.float64)  # (B, pairs, 2) each
    u = (hi * 67108864.0 + lo) * _INV_2_53
    return u.reshape(-1, pairs * 2)[:, :numel]


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
    """Noise of shape (B, *shape) on ``device``, the same tensor the fused denoising step draws for these streams.

    The Philox kernel draws it on CUDA devices, :func:`philox_normal_reference`
    everywhere else, so a stream's noise is the same on every device (to
    float32 rounding of log/sin/cos). This is what
    :meth:`mmtts.core.rng.Streams.randn` returns.
    """
    from .dispatch import use_triton

    device = torch.device(device)
    numel = math.prod(shape)
    seed_t = torch.as_tensor(seed)
    seed_t, offset_t = check_seed_offset(seed_t, offset, seed_t.reshape(-1).shape[0], device)
    if use_triton(seed_t):
        from .philox_triton import philox_normal

        out = philox_normal(seed_t, offset_t, numel)
    else:
        out = philox_normal_reference(seed_t, offset_t, numel)
    return out.reshape(seed_t.shape[0], *shape).to(dtype)
