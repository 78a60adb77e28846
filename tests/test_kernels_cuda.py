"""The compiled Triton kernels on a CUDA device against their references (skipped without a GPU).

The interpreter tests check the kernels' logic on the CPU; these check what
only real compilation can change (autotuned block sizes, libdevice math,
float16/bfloat16 conversions) wherever a GPU is present.
"""

import pytest
import torch

import mmtts.kernels as K

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def _auto_dispatch(monkeypatch):
    monkeypatch.setenv("MMTTS_KERNELS", "auto")


def _on(device, *ts):
    return [t.to(device) for t in ts]


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", [(1, 1023), (3, 1500), (5, 4, 67, 67), (2, 16, 128, 128)])
def test_denoise_step_on_cuda(shape, dtype):
    from mmtts.core.rng import Streams

    g = torch.Generator().manual_seed(0)
    x, out, z = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    coefs = K.ddim_coefficients(torch.linspace(0.2, 0.8, shape[0]), torch.linspace(0.4, 0.9, shape[0]), eta=0.6)
    streams = Streams.spawn(3, shape[0])
    for kwargs in ({"z": z}, {"seed": streams.seeds, "offset": streams.counters}, {}):
        want = K.denoise_step_reference(x, out, coefs, **kwargs)
        on_gpu = {k: v.cuda() for k, v in kwargs.items()}
        got = K.denoise_step(x.cuda(), out.cuda(), coefs.to("cuda"), **on_gpu)
        for g_, w in zip(got, want):
            assert g_.is_cuda and g_.dtype == dtype
            torch.testing.assert_close(g_.cpu().float(), w.float(), rtol=TOL[dtype], atol=TOL[dtype] * 4)


def test_noise_on_cuda_is_the_reference_noise():
    seeds, offsets = torch.tensor([5, 2**40 + 3, 77]), torch.tensor([0, 9, 2**33])
    got = K.candidate_noise(seeds.cuda(), offsets.cuda(), (4, 1023), device="cuda")
    want = K.candidate_noise(seeds, offsets, (4, 1023))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


def test_image_search_gives_the_cpu_result_on_cuda():
    """Same seed, same candidates on both devices: Philox noise and the one step definition, to float32 rounding."""
    from diffusers import DDIMScheduler

    from mmtts.core import Streams
    from mmtts.modalities.image import ImageProcess, schedule_from_scheduler

    schedule = schedule_from_scheduler(DDIMScheduler(num_train_timesteps=100, clip_sample=True), 6, eta=1.0)
    results = []
    for device in ("cpu", "cuda"):
        proc = ImageProcess(lambda x, t, c: 0.7 * x - 0.01 * t.reshape(-1, 1, 1, 1), schedule, (3, 17, 9),
                            device=device)
        st = proc.perturb(proc.init(Streams.spawn(5, 4)), 0.3)
        while int(st.stage.min()) < proc.num_stages:
            st = proc.step(st)
        results.append(st.data["x"].cpu())
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", [(1, 3, 1023), (7, 3), (64, 32, 7, 7), (8, 16, 56, 56)])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_batch_norm_on_cuda(shape, dtype, alpha):
    g = torch.Generator().manual_seed(1)
    c = shape[1]
    x = (torch.randn(shape, generator=g) * 2 + 1).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    rm, rv = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
    results = []
    for device in ("cuda", "cpu"):
        xi, wi, bi = (t.to(device).requires_grad_() for t in (x, w, b))
        rmi, rvi = _on(device, rm, rv)
        y = K.batch_norm(xi, rmi, rvi, wi, bi, source_weight=alpha)
        grads = torch.autograd.grad(y, (xi, wi, bi), dy.to(device))
        results.append([t.detach().cpu().float() for t in (y, *grads, rmi, rvi)])
    for got, want in zip(*results):
        scale = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got, want, rtol=TOL[dtype] * 2, atol=TOL[dtype] * 2 * scale)


def test_batch_norm_matches_cudnn():
    bn = torch.nn.BatchNorm2d(64).cuda()
    x = torch.randn(32, 64, 28, 28, device="cuda")
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    torch.testing.assert_close(K.batch_norm(x, rm, rv, bn.weight, bn.bias), bn(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rv, bn.running_var, rtol=1e-5, atol=1e-6)
