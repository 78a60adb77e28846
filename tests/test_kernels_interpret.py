"""Triton kernels against their references, run on the CPU by Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, so the default
test run launches this file again in a fresh interpreter process with
``TRITON_INTERPRET=1 MMTTS_KERNELS=triton`` (``test_interpreter_subset``); the
kernel tests themselves only run inside that process. To run them directly:

    TRITON_INTERPRET=1 MMTTS_KERNELS=triton python -m pytest tests/test_kernels_interpret.py -m triton_interpret
"""

import math
import os
import re
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.triton_interpret

INSIDE = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("MMTTS_KERNELS") == "triton"
inside_only = pytest.mark.skipif(not INSIDE,
                                 reason="runs in the interpreter process that test_interpreter_subset starts")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.skipif(INSIDE, reason="this is the launcher; the kernel tests are running")
def test_interpreter_subset():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "MMTTS_KERNELS": "triton"}
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-m", "triton_interpret and not slow", "-p",
           "no:cacheprovider", "-W", "ignore::DeprecationWarning"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreter kernel tests failed:\n{tail}"
    summary = proc.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    skipped = re.search(r"(\d+) skipped", summary)
    assert passed and int(passed.group(1)) >= 50, f"too few kernel tests ran:\n{tail}"
    assert skipped is None or int(skipped.group(1)) == 1, f"kernel tests were skipped in the interpreter:\n{tail}"


def _data(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(3)]


def _assert_kernel_ran(module):
    assert f"mmtts.kernels.{module}" in sys.modules, f"the call took the reference path, not mmtts.kernels.{module}"


@inside_only
def test_canary_interpreter_returns_real_values():
    """Fails loudly if the interpreter silently returns zeros (or the call never reached a kernel)."""
    import mmtts.kernels as K

    x = torch.arange(1, 1024, dtype=torch.float32)[None]
    ones = torch.ones(1)
    coefs = K.StepCoefficients(2 * ones, -ones, 0 * ones, ones, 3 * ones)
    x_next, x0 = K.denoise_step(x, torch.ones_like(x), coefs)
    _assert_kernel_ran("denoise_triton")
    assert bool((x_next != 0).all()), "interpreter returned zeros from the denoising kernel"
    torch.testing.assert_close(x_next, 2 * x - 1, rtol=0, atol=0)
    torch.testing.assert_close(x0, x + 3, rtol=0, atol=0)
    y = K.normalize_affine(x[None].repeat(2, 1, 1), torch.tensor([5.0]), torch.tensor([4.0]), eps=0.0)
    _assert_kernel_ran("norm_triton")
    torch.testing.assert_close(y[0, 0], (x[0] - 5) / 2, rtol=0, atol=0)
    stats = K.batch_norm_stats(x[None])
    assert float(stats.mean) == 512.0 and abs(float(stats.var) - (1023**2 - 1) / 12) < 1e-2


@inside_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1023), (3, 1500), (2, 3, 7, 11)])
@pytest.mark.parametrize("noise", ["given", "drawn", "none", "clipped"])
def test_denoise_kernel_matches_reference(shape, dtype, noise):
    import mmtts.kernels as K
    from mmtts.core.rng import Streams

    x, out, z = _data(shape, dtype)
    clip = torch.linspace(0.5, 3.0, shape[0]) if noise == "clipped" else None
    sched = K.ddim_coefficients(torch.linspace(0.2, 0.8, shape[0]), torch.linspace(0.4, 0.9, shape[0]), eta=0.8,
                                clip=clip)
    streams = Streams.spawn(9, shape[0])
    kwargs = {"given": {"z": z}, "drawn": {"seed": streams.seeds, "offset": streams.counters + 3}, "none": {},
              "clipped": {"seed": streams.seeds, "offset": streams.counters}}[noise]
    got = K.denoise_step(x, out, sched, **kwargs)
    _assert_kernel_ran("denoise_triton")
    want = K.denoise_step_reference(x, out, sched, **kwargs)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=TOL[dtype], atol=TOL[dtype])


@inside_only
def test_kernel_noise_statistics():
    import mmtts.kernels as K
    from mmtts.core.rng import Streams

    streams = Streams.spawn(77, 4)
    n = 4096
    z = K.candidate_noise(streams.seeds, streams.counters, (n,))
    _assert_kernel_ran("philox_triton")
    torch.testing.assert_close(z, K.philox_normal_reference(streams.seeds, streams.counters, n), rtol=0, atol=1e-5)
    zd = z.double()
    for row in zd:
        assert abs(float(row.mean())) < 5 / math.sqrt(n)
        assert abs(float(row.var()) - 1) < 5 * math.sqrt(2 / n)
    assert (torch.corrcoef(zd) - torch.eye(4)).abs().max() < 5 / math.sqrt(n)
    again = K.candidate_noise(streams.seeds, streams.counters, (n,))
    assert torch.equal(again, z)  # same seed, same noise
    same_seed = K.candidate_noise(streams.seeds[[1, 1]], torch.tensor([0, 0]), (n,))
    assert torch.equal(same_seed[0], same_seed[1]) and torch.equal(same_seed[0], z[1])
    next_draw = K.candidate_noise(streams.seeds, streams.counters + 1, (n,))
    assert float(torch.corrcoef(torch.stack([next_draw[0], z[0]]).double())[0, 1]) < 5 / math.sqrt(n)


@inside_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3, 1023), (4, 2, 1500), (7, 3), (2, 5, 3, 3), (5000, 2)])
def test_stats_kernel_matches_reference(shape, dtype):
    import mmtts.kernels as K

    x = (torch.randn(shape) * 3 + 2).to(dtype)
    got = K.batch_norm_stats(x)
    _assert_kernel_ran("norm_triton")
    want = K.batch_norm_stats_reference(x)
    assert got.mean.dtype == torch.float32 and got.count == want.count
    torch.testing.assert_close(got.mean, want.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.var, want.var, rtol=1e-5, atol=1e-5)


@inside_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", [dict(training=True), dict(training=True, source_weight=0.3),
                                  dict(training=True, source_weight=0.3, exact_mixture=True),
                                  dict(training=False)])
@pytest.mark.parametrize("shape", [(3, 4, 341), (2, 5, 1500)])
def test_batch_norm_forward_backward_kernels(shape, mode, dtype, monkeypatch):
    import mmtts.kernels as K

    g = torch.Generator().manual_seed(5)
    c = shape[1]
    x = (torch.randn(shape, generator=g) * 2 + 1).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    results = []
    for backend in ("triton", "torch"):
        monkeypatch.setenv("MMTTS_KERNELS", backend)
        rm, rv = torch.randn(c, generator=torch.Generator().manual_seed(1)), torch.full((c,), 1.5)
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        y = K.batch_norm(xi, rm, rv, wi, bi, momentum=0.3, **mode)
        grads = torch.autograd.grad(y, (xi, wi, bi), dy)
        results.append((y, *grads, rm, rv))
    _assert_kernel_ran("norm_triton")
    for got, want in zip(*results):
        torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype] * 2, atol=TOL[dtype] * 2)


@inside_only
def test_stats_kernel_is_stable_for_a_large_mean():
    """Welford/Chan in float32 keeps a small variance under a large mean (a naive E[x^2] - E[x]^2 would not)."""
    import mmtts.kernels as K

    x = torch.randn(4, 3, 1500, dtype=torch.float64) * 0.01 + 1000
    got = K.batch_norm_stats(x.float())
    want = x.var(dim=(0, 2), unbiased=False)
    torch.testing.assert_close(got.var.double(), want, rtol=2e-3, atol=0)


@inside_only
@pytest.mark.parametrize("method", ["bn", "alpha-bn", "tent"])
def test_the_adapters_normalize_with_the_kernels(method, monkeypatch):
    """An adapter's BatchNorm layers take the kernels (never the reference) and match the reference's results."""
    import mmtts
    import mmtts.kernels.stats as kstats
    from torch import nn

    reference = kstats.batch_norm_stats_reference
    monkeypatch.setattr(torch.nn.functional, "batch_norm", lambda *a, **kw: pytest.fail("took PyTorch's batch norm"))
    x = torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(7)) * 2 + 1
    results = []
    for backend in ("triton", "torch"):
        monkeypatch.setenv("MMTTS_KERNELS", backend)
        if backend == "triton":
            monkeypatch.setattr(kstats, "batch_norm_stats_reference", lambda t: pytest.fail("took the reference"))
        else:
            monkeypatch.setattr(kstats, "batch_norm_stats_reference", reference)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                              nn.Linear(100, 3)).eval()
        ad = mmtts.adapt(model, method, **({"lr": 0.05} if method == "tent" else {}))
        outs = [ad(x) for _ in range(2)]  # the second call sees tent's update
        results.append((*outs, model[1].weight.detach().clone(), model[1].bias.detach().clone()))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
