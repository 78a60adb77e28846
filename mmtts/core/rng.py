"""Per-candidate, counter-based random streams.

Every candidate in a search owns a stream identified by ``(seed, counter)``.
A draw is Philox-4x32-10 keyed by the seed at the counter (the Triton kernel
on CUDA, its torch reference elsewhere, :mod:`mmtts.kernels.philox`), after
which the counter is bumped; so a stream is a pair of integers: it can be
copied with its candidate, saved in a checkpoint and resumed exactly, and its
noise never depends on how candidates were batched together or on the device.

When a resampling step duplicates a candidate, the first copy keeps the
stream and every further copy is *forked*: it gets a new seed derived from the
parent's seed, counter and copy index. Copies therefore diverge (as particle
filters need) while the whole run stays a pure function of the root seed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

_MASK = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One round of the SplitMix64 mixer: a bijective 64-bit integer hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """Hash any number of integers into one 63-bit seed (valid for torch)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = splitmix64(h ^ (int(p) & _MASK))
    return h >> 1


_U64 = np.uint64
_PER_ITEM_BELOW = 16  # measured: below this many seeds, plain integers beat numpy's fixed per-call cost
_SPLITMIX = tuple(_U64(c) for c in (0x9E3779B97F4A7C15, 30, 0xBF58476D1CE4E5B9, 27, 0x94D049BB133111EB, 31))


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    """:func:`splitmix64` over a uint64 array (numpy's uint64 array arithmetic wraps mod 2**64, as the mask does)."""
    add, s1, m1, s2, m2, s3 = _SPLITMIX
    x = x + add
    x = (x ^ (x >> s1)) * m1
    x = (x ^ (x >> s2)) * m2
    return x ^ (x >> s3)


def derive_seeds(*parts) -> np.ndarray:
    """:func:`derive_seed` elementwise over equal-length 1-D integer sequences (scalars broadcast): int64 (n,)."""
    n = max((1 if isinstance(p, (int, np.integer)) else len(p)) for p in parts)
    if n < _PER_ITEM_BELOW:
        cols = [[int(p)] * n if isinstance(p, (int, np.integer)) else
                (p.tolist() if isinstance(p, (torch.Tensor, np.ndarray)) else list(p)) for p in parts]
        return np.array([derive_seed(*row) for row in zip(*cols)], dtype=np.int64).reshape(n)
    h = np.full(n, 0x243F6A8885A308D3, dtype=np.uint64)  # an array from the start: array arithmetic never warns
    for p in parts:
        h = _splitmix64_array(h ^ _as_u64(p))
    return (h >> _U64(1)).view(np.int64)


def _as_u64(p) -> np.ndarray:
    """The 64-bit two's-complement bits of integers, as ``int(p) & _MASK`` takes them."""
    if isinstance(p, torch.Tensor):
        p = p.cpu().numpy()
    if isinstance(p, np.ndarray):
        return np.ascontiguousarray(p.astype(np.int64, copy=False)).reshape(-1).view(np.uint64)
    if isinstance(p, (int, np.integer)):
        return np.uint64(int(p) & _MASK)
    return np.array([int(v) & _MASK for v in p], dtype=np.uint64)


def fork_keys(index: list[int], fork_all: bool) -> list[int | None]:
    """For each position of a gather, the key that derives a forked child, or None to keep the stream.

    The k-th copy of a candidate (k >= 1) is forked with key k; with
    ``fork_all`` the first copy is forked too, with keys distinct from those.
    """
    seen: dict[int, int] = {}
    out: list[int | None] = []
    for src in index:
        k = seen.get(src, 0)
        seen[src] = k + 1
        out.append(k + (1 << 32) * fork_all if (k > 0 or fork_all) else None)
    return out


def fork_values(values: torch.Tensor, counters: torch.Tensor, keys: Sequence[int | None]) -> torch.Tensor:
    """How a forked copy's integers are derived: ``values`` (int64, (B,)) with entry j replaced by
    ``derive_seed(values[j], counters[j], keys[j])`` wherever ``keys[j]`` is not None (a new tensor).

    ``counters`` are the copied candidates' stream counters at the fork. A
    forked stream's seed is derived this way from its parent's seed, and in a
    :class:`~mmtts.core.state.State` the copy's id from its parent's id.
    """
    out = values.detach().cpu().clone()
    pos = [j for j, k in enumerate(keys) if k is not None]
    if pos:
        at = np.asarray(pos, dtype=np.int64)
        v = out.numpy()  # a view of the copy
        v[at] = derive_seeds(v[at], counters.cpu().numpy()[at], [keys[j] for j in pos])
    return out.to(values.device)


class Streams:
    """A batch of independent random streams, one per candidate.

    Args:
        seeds: (B,) integers, one stream seed per candidate (kept as int64 on the CPU).
        counters: (B,) integers, the draws each stream has made (default: zeros).

    :meth:`unchecked` builds streams from tensors known to be valid, without checks or copies.
    """

    def __init__(self, seeds: torch.Tensor, counters: torch.Tensor | None = None):
        seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1)
        if counters is None:
            counters = torch.zeros_like(seeds)
        counters = torch.as_tensor(counters, dtype=torch.int64).reshape(-1)
        if seeds.shape != counters.shape:
            raise ValueError(f"seeds {tuple(seeds.shape)} and counters {tuple(counters.shape)} differ in shape")
        self.seeds = seeds.cpu()
        self.counters = counters.cpu()

    @classmethod
    def unchecked(cls, seeds: torch.Tensor, counters: torch.Tensor) -> "Streams":
        """Streams over ``seeds`` and ``counters`` as given: no checks and no copies.

        For int64 (B,) CPU tensors known to be valid, such as gathers or
        concatenations of valid streams (the constructor converts and checks).
        """
        out = cls.__new__(cls)
        out.seeds, out.counters = seeds, counters
        return out

    @classmethod
    def spawn(cls, root_seed: int, n: int, start: int = 0) -> "Streams":
        """``n`` streams derived from one root seed; stream i is the same whatever ``n`` is."""
        return cls(torch.from_numpy(derive_seeds(root_seed, np.arange(start, start + n, dtype=np.int64))))

    def __len__(self) -> int:
        return int(self.seeds.numel())

    def draw_seeds(self) -> list[int]:
        """One integer seed per stream for its next draw, hashed from (seed, counter), in order.

        For samplers that take a seed per answer rather than a tensor of noise
        (the GUI samplers); the caller advances the counters after using them.
        """
        if len(self) < _PER_ITEM_BELOW:  # derive_seeds' per-item path, without the round trip through numpy
            return [derive_seed(s, c) for s, c in zip(self.seeds.tolist(), self.counters.tolist())]
        return derive_seeds(self.seeds, self.counters).tolist()

    def randn(self, shape: Sequence[int], device="cpu", dtype=torch.float32) -> torch.Tensor:
        """One standard normal tensor of ``shape`` per candidate, drawn on ``device``: result (B, *shape).

        Row i is a pure function of stream i's (seed, counter) (Philox,
        :func:`mmtts.kernels.candidate_noise`: the Triton kernel on CUDA, its
        torch reference elsewhere, equal to float32 rounding), so it depends
        neither on the batch nor on the device. Every stream advances by one.
        """
        from ..kernels.philox import candidate_noise

        out = candidate_noise(self.seeds, self.counters, tuple(shape), device=device, dtype=dtype)
        self.counters += 1
        return out

    def rand(self, shape: Sequence[int] = (), device="cpu") -> torch.Tensor:
        """Uniform [0, 1) float64 draws (53 random bits), one tensor of ``shape`` per candidate; advances every stream.

        Row i is a pure function of stream i's (seed, counter), as in :meth:`randn`
        (:func:`mmtts.kernels.philox_uniform_reference`, on ``device``).
        """
        from ..kernels.philox import philox_uniform_reference

        shape = tuple(shape)
        device = torch.device(device)
        out = philox_uniform_reference(self.seeds.to(device), self.counters.to(device), int(np.prod(shape)))
        self.counters += 1
        return out.reshape(len(self), *shape)

    def select(self, index: torch.Tensor, fork_duplicates: bool, fork_all: bool = False) -> "Streams":
        """Streams of the candidates at ``index``.

        With ``fork_duplicates`` the second and later copies of a candidate get
        derived seeds, so they draw different noise from then on; with
        ``fork_all`` every copy does (children that must not replay their parent).
        """
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1).cpu()
        return self.take(index, fork_keys(index.tolist(), fork_all) if fork_duplicates else None)

    def take(self, index: torch.Tensor, keys: Sequence[int | None] | None = None) -> "Streams":
        """Streams at the int64 CPU ``index``; where ``keys[j]`` is not None, copy j is forked with that key.

        A forked copy's seed is :func:`fork_values` of its seed, and its counter restarts at 0.
        """
        seeds, counters = self.seeds.index_select(0, index), self.counters.index_select(0, index)  # copies
        forked = [j for j, k in enumerate(keys) if k is not None] if keys is not None else []
        if forked:
            seeds = fork_values(seeds, counters, keys)
            counters.numpy()[forked] = 0  # a view of the copy
        return Streams.unchecked(seeds, counters)

    @staticmethod
    def cat(items: Sequence["Streams"]) -> "Streams":
        return Streams.unchecked(torch.cat([s.seeds for s in items]), torch.cat([s.counters for s in items]))

    def clone(self) -> "Streams":
        return Streams.unchecked(self.seeds.clone(), self.counters.clone())

    def state_dict(self) -> dict:
        return {"seeds": self.seeds.clone(), "counters": self.counters.clone()}

    @classmethod
    def from_state_dict(cls, d: dict) -> "Streams":
        return cls(d["seeds"], d["counters"])


class StrategyRNG:
    """The strategy's own random stream (resampling draws, tournament picks).

    Counter-based like :class:`Streams` so that it checkpoints as two integers.

    Args:
        seed: the run's root seed.
        counter: the draws made so far.
    """

    def __init__(self, seed: int, counter: int = 0):
        self.seed = int(seed)
        self.counter = int(counter)

    def numpy(self) -> np.random.Generator:
        """A numpy generator for the next draw; advances the counter."""
        g = np.random.default_rng(derive_seed(self.seed, self.counter, 0x5EED))
        self.counter += 1
        return g

    def torch(self) -> torch.Generator:
        """A torch CPU generator for the next draw; advances the counter."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.counter, 0x70C4))
        self.counter += 1
        return g

    def state_dict(self) -> dict:
        return {"seed": self.seed, "counter": self.counter}

    @classmethod
    def from_state_dict(cls, d: dict) -> "StrategyRNG":
        return cls(d["seed"], d["counter"])
