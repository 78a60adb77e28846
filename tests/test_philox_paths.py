"""The Philox reference's routes to the same words: Python integers or numpy on the CPU, torch elsewhere.

The rounds are one function of integer operators; the CPU runs them on
Python integers (a few blocks) or numpy uint64 arrays, every other non-CUDA
device on int64 tensors. These tests hold the routes to the same words, bit
for bit, and pin a few draws, so that a faster route can never change the
noise a seed gives.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmtts.kernels import philox
from mmtts.kernels.philox import philox4x32, philox_normal_reference, philox_uniform_reference

M32 = 0xFFFFFFFF


def _torch_route(seed: torch.Tensor, offset: torch.Tensor, quads: int) -> torch.Tensor:
    """The counter layout of a draw, through the torch route (what a non-CPU device runs)."""
    seed, offset = seed.reshape(-1, 1), offset.reshape(-1, 1)
    return philox4x32(torch.arange(quads), offset & M32, offset >> 32, 0, seed & M32, (seed >> 32) & M32)


def test_numpy_torch_and_integer_words_agree():
    g = torch.Generator().manual_seed(7)
    c = torch.randint(0, 2 ** 32, (4, 257), generator=g, dtype=torch.int64)
    k = torch.randint(0, 2 ** 32, (2, 257), generator=g, dtype=torch.int64)
    c[:, :2], k[:, :2] = torch.tensor([[0], [M32]]).T, torch.tensor([[0], [M32]]).T  # the extreme words
    via_torch = philox4x32(*c, *k)
    via_numpy = philox4x32(*(t.numpy().astype(np.uint64) for t in (*c, *k)))
    assert via_torch.dtype == torch.int64 and via_numpy.dtype == np.uint64
    assert np.array_equal(via_numpy.astype(np.int64), via_torch.numpy())
    for col in (0, 1, 100):  # Python integers take the same path as tensors
        ints = philox4x32(*(int(t[col]) for t in (*c, *k)))
        assert ints.tolist() == via_torch[:, col].tolist()


@pytest.mark.parametrize("below", [0, 10 ** 9], ids=["numpy", "python-integers"])
def test_cpu_words_equal_the_torch_route(monkeypatch, below):
    monkeypatch.setattr(philox, "_PER_BLOCK_BELOW", below)  # every draw takes one CPU route
    g = torch.Generator().manual_seed(3)
    for b, quads in ((1, 1), (3, 2), (16, 2), (5, 100)):
        seed = torch.randint(-2 ** 63, 2 ** 63 - 1, (b,), generator=g, dtype=torch.int64)
        offset = torch.randint(0, 2 ** 62, (b,), generator=g, dtype=torch.int64)
        offset[0] = 0
        cpu = philox._words(seed, offset, quads)
        assert cpu.dtype == torch.int64 and cpu.shape == (b, quads, 4) and cpu.is_contiguous()
        assert torch.equal(cpu, _torch_route(seed, offset, quads).permute(1, 2, 0))


SEED = torch.tensor([0, 0x0123456789ABCDEF, -(2 ** 63)])
OFFSET = torch.tensor([0, 2 ** 62, 3])
NORMALS = [["0x1.fb766ap-1", "-0x1.d96d5ep-1", "-0x1.3c373ap-1", "-0x1.eda36ep-2", "-0x1.3aa6bap-3", "0x1.7254eep-3"],
           ["0x1.4c5d2p-3", "-0x1.965482p+0", "-0x1.12232ep+0", "-0x1.2f7922p-2", "-0x1.06b078p+0", "0x1.ca72f8p-2"],
           ["0x1.24b7cep+1", "0x1.827224p-2", "0x1.b7fa04p-3", "0x1.31f74ap-3", "0x1.aac2eep+0", "-0x1.173508p+0"]]
UNIFORMS = [["0x1.989fa370b4e2cp-2", "0x1.78af58a6c036fp-1", "0x1.f1c999572c803p-1"],
            ["0x1.1ec3836213620p-2", "0x1.142dee22c0099p-1", "0x1.11973a9bcf384p-1"],
            ["0x1.17225e0d53cb8p-4", "0x1.eec48806307b9p-1", "0x1.198fc2e8651b0p-3"]]


@pytest.mark.parametrize("below", [0, 10 ** 9], ids=["numpy", "python-integers"])
def test_draws_are_pinned_bit_for_bit(monkeypatch, below):
    monkeypatch.setattr(philox, "_PER_BLOCK_BELOW", below)
    normals = philox_normal_reference(SEED, OFFSET, 6)
    assert normals.tolist() == [[float.fromhex(h) for h in row] for row in NORMALS]
    uniforms = philox_uniform_reference(SEED, OFFSET, 3)
    assert uniforms.tolist() == [[float.fromhex(h) for h in row] for row in UNIFORMS]
