"""Kernel references against PyTorch and diffusers, dispatch, input checks and noise statistics (no Triton needed)."""

import math
import os
import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from scipy import stats as sstats

import mmtts.kernels as K
from mmtts.kernels import philox
from mmtts.kernels.dispatch import interpreting, use_triton

ODD_SHAPES = [(1, 1023), (3, 1500), (2, 3, 11, 31)]  # batch 1, odd flat sizes, image-like


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    """Every test here checks the pure-torch path, whatever the caller's environment."""
    monkeypatch.setenv("MMTTS_KERNELS", "torch")


def _data(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(3)]


# ---------------------------------------------------------------- denoising step against diffusers

def _close(ours, theirs, dtype, scale=1.0):
    tol = {torch.float32: 2e-5, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=tol, atol=tol * scale)


def _per_candidate(step, x, out, z, timesteps):
    """Run a diffusers step once per candidate (each at its own timestep) and stack the results."""
    results = [step(out[i:i + 1], int(t), x[i:i + 1], z[i:i + 1]) for i, t in enumerate(timesteps)]
    return [torch.cat(parts) for parts in zip(*results)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta,clip", [(0.0, False), (0.7, False), (0.7, True)])
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_ddim_matches_diffusers(shape, eta, clip, prediction_type, dtype):
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=clip, clip_sample_range=1.5,
                          prediction_type=prediction_type)
    sched.set_timesteps(10)
    timesteps = sched.timesteps[[0, 4, 9, 2, 7][: shape[0]]]
    x, out, z = _data(shape, dtype)

    def step(o, t, xs, zs):
        r = sched.step(o, t, xs, eta=eta, variance_noise=zs)
        return r.prev_sample, r.pred_original_sample

    want_next, want_x0 = _per_candidate(step, x, out, z, timesteps)
    coefs = K.coefficients_from_scheduler(sched, timesteps, eta=eta)
    assert (coefs.clip is not None) == clip
    if clip:
        assert float(want_x0.abs().max()) == 1.5  # some x0 predictions were clipped
    got_next, got_x0 = K.denoise_step(x, out, coefs, z=z)
    assert got_next.dtype == dtype and got_x0.dtype == dtype
    scale = float(coefs.x0_a.abs().max() + coefs.x0_b.abs().max())  # 1/sqrt(alpha_bar) reaches ~80 at t=981
    _close(got_next, want_next, dtype, scale)
    _close(got_x0, want_x0, dtype, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("variance_type,clip", [("fixed_small", False), ("fixed_small_log", False),
                                               ("fixed_large", False), ("fixed_small", True)])
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_ddpm_matches_diffusers_with_given_generator(shape, variance_type, clip, prediction_type, dtype):
    sched = DDPMScheduler(num_train_timesteps=1000, clip_sample=clip, prediction_type=prediction_type,
                          variance_type=variance_type)
    sched.set_timesteps(12)
    timesteps = sched.timesteps[[11, 3, 0, 6][: shape[0]]]  # 11 is t=0: the final step adds no noise
    x, out, _ = _data(shape, dtype)
    z = torch.cat([torch.randn((1, *shape[1:]), generator=torch.Generator().manual_seed(100 + i), dtype=dtype)
                   for i in range(shape[0])])

    def step(o, t, xs, i):
        r = sched.step(o, t, xs, generator=torch.Generator().manual_seed(100 + i))
        return r.prev_sample, r.pred_original_sample

    results = [step(out[i:i + 1], int(t), x[i:i + 1], i) for i, t in enumerate(timesteps)]
    want_next, want_x0 = (torch.cat(p) for p in zip(*results))
    coefs = K.coefficients_from_scheduler(sched, timesteps)
    assert float(coefs.c[0]) == 0.0  # t = 0
    got_next, got_x0 = K.denoise_step(x, out, coefs, z=z)
    scale = float(coefs.x0_a.abs().max() + coefs.x0_b.abs().max())
    _close(got_next, want_next, dtype, scale)
    _close(got_x0, want_x0, dtype, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_flow_match_euler_matches_diffusers(shape, stochastic, dtype):
    def make():
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, stochastic_sampling=stochastic)
        sched.set_timesteps(8)
        return sched

    sched = make()
    timesteps = sched.timesteps[[0, 5, 7, 2][: shape[0]]]
    x, out, _ = _data(shape, dtype)
    z = torch.cat([torch.randn((1, *shape[1:]), generator=torch.Generator().manual_seed(7 + i))
                   for i in range(shape[0])])
    want = []
    for i, t in enumerate(timesteps):  # a fresh scheduler per candidate: each sits at its own timestep
        step = make().step(out[i:i + 1], t, x[i:i + 1], generator=torch.Generator().manual_seed(7 + i))
        want.append(step.prev_sample)
    want = torch.cat(want)
    coefs = K.coefficients_from_scheduler(sched, timesteps)
    got_next, got_x0 = K.denoise_step(x, out, coefs, z=z)
    _close(got_next, want, dtype)
    sigma = sched.sigmas[[0, 5, 7, 2][: shape[0]]].reshape((-1,) + (1,) * (len(shape) - 1))
    _close(got_x0, x.float() - sigma * out.float(), dtype)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_flow_match_eta_keeps_the_noise_level(eta):
    """For x = (1-s)x0 + s*e and out = e - x0, the step lands on (1-s')x0 + s'(sqrt(1-eta^2)e + eta*z)."""
    x0, e, z = _data((3, 257), torch.float64, seed=3)
    sigma, sigma_next = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.7, 0.3, 0.0])
    s, sn = sigma[:, None].double(), sigma_next[:, None].double()
    x = (1 - s) * x0 + s * e
    coefs = K.flow_match_coefficients(sigma, sigma_next, eta)
    assert coefs.clip is None and coefs.d is None
    a, b, c, x0_a, x0_b = (t[:, None].double() for t in coefs[:5])
    want = (1 - sn) * x0 + sn * (math.sqrt(1 - eta**2) * e + eta * z)
    torch.testing.assert_close(a * x + b * (e - x0) + c * z, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x0_a * x + x0_b * (e - x0), x0, rtol=1e-6, atol=1e-6)


def test_ddim_eta_one_has_the_ddpm_variance():
    sched = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    ac = sched.alphas_cumprod
    t, prev = torch.tensor([900, 500, 40]), torch.tensor([800, 400, 0])
    ddim = K.ddim_coefficients(ac[t], ac[prev], eta=1.0)
    ddpm = K.ddpm_coefficients(ac[t], ac[prev])
    torch.testing.assert_close(ddim.c, ddpm.c)


def test_scheduler_checks():
    sched = DDIMScheduler(thresholding=True)
    sched.set_timesteps(5)
    with pytest.raises(ValueError, match="thresholding=False"):
        K.coefficients_from_scheduler(sched, sched.timesteps[:2])
    ddpm = DDPMScheduler(clip_sample=False)
    ddpm.set_timesteps(5)
    with pytest.raises(ValueError, match="no eta"):
        K.coefficients_from_scheduler(ddpm, ddpm.timesteps[:1], eta=0.5)
    flow = FlowMatchEulerDiscreteScheduler()
    flow.set_timesteps(4)
    with pytest.raises(ValueError, match="set_timesteps"):
        K.coefficients_from_scheduler(flow, torch.tensor([3.0]))
    with pytest.raises(TypeError, match="DDIMScheduler"):
        K.coefficients_from_scheduler(object(), [1])
    with pytest.raises(ValueError, match="prediction_type"):
        K.ddim_coefficients(torch.tensor([0.5]), torch.tensor([0.6]), prediction_type="noise")
    with pytest.raises(ValueError, match="variance-preserving"):
        K.alpha_sigma_coefficients([0.5], [0.5], [0.7], [0.3], "flow", update="ddpm")
    with pytest.raises(ValueError, match="update"):
        K.alpha_sigma_coefficients([0.5], [0.8], [0.7], [0.6], update="heun")
    with pytest.raises(ValueError, match="no eta"):
        K.alpha_sigma_coefficients([0.5], [0.8], [0.7], [0.6], update="ddpm", eta=0.5)
    with pytest.raises(ValueError, match="fixed_large_log"):
        K.ddpm_coefficients([0.5], [0.7], variance_type="fixed_large_log")
    with pytest.raises(ValueError, match="model's output"):
        K.ddpm_coefficients([0.5], [0.7], variance_type="learned_range")


def test_denoise_step_input_errors():
    x, out, z = _data((2, 9), torch.float32)
    coefs = K.ddim_coefficients(torch.tensor([0.3, 0.4]), torch.tensor([0.5, 0.6]), eta=0.5)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        K.denoise_step(x, out, coefs.select(torch.tensor([0])))
    with pytest.raises(ValueError, match="model_output has shape"):
        K.denoise_step(x, out[:, :5], coefs)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        K.denoise_step(x.long(), out, coefs)
    with pytest.raises(TypeError, match="StepCoefficients"):
        K.denoise_step(x, out, (1, 2, 3))
    with pytest.raises(TypeError, match="integers"):
        K.denoise_step(x, out, coefs, seed=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="one per candidate"):
        K.denoise_step(x, out, coefs, seed=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="non-negative"):
        K.denoise_step(x, out, coefs, seed=torch.tensor([1, 2]), offset=torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="clip and d go together"):
        K.denoise_step(x, out, coefs._replace(clip=torch.ones(2)))
    with pytest.raises(ValueError, match="with and without clip"):
        K.StepCoefficients.cat([coefs, K.ddim_coefficients([0.3], [0.5], clip=1.0)])


def test_deterministic_step_and_coefficient_bookkeeping():
    x, out, _ = _data((3, 50), torch.float32)
    coefs = K.ddim_coefficients(torch.tensor([0.3, 0.4, 0.5]), torch.tensor([0.5, 0.6, 0.7]), eta=0.0)
    x_next, x0 = K.denoise_step(x, out, coefs)
    torch.testing.assert_close(x_next, (coefs.a[:, None] * x + coefs.b[:, None] * out).float())
    assert K.denoise_step(x, out, coefs, return_x0=False)[1] is None
    picked = coefs.select(torch.tensor([2, 0]))
    torch.testing.assert_close(K.StepCoefficients.cat([picked, coefs]).a, torch.cat([coefs.a[[2, 0]], coefs.a]))


def test_clip_corrects_only_the_clipped_elements():
    """x_next moves by d * (clip(x0) - x0) where x0 leaves the bound, and nowhere else; inf means no bound."""
    x, out, z = _data((3, 200), torch.float32, seed=4)
    free = K.ddim_coefficients(torch.tensor([0.02, 0.4, 0.9]), torch.tensor([0.1, 0.6, 0.95]), eta=0.5)
    bound = torch.tensor([1.0, float("inf"), 0.5])
    clipped = K.ddim_coefficients(torch.tensor([0.02, 0.4, 0.9]), torch.tensor([0.1, 0.6, 0.95]), eta=0.5, clip=bound)
    torch.testing.assert_close(clipped.d, torch.tensor([0.1, 0.6, 0.95]).double().sqrt())  # x0's weight
    nxt_free, x0_free = K.denoise_step(x, out, free, z=z)
    nxt, x0 = K.denoise_step(x, out, clipped, z=z)
    want_x0 = torch.minimum(torch.maximum(x0_free, -bound[:, None]), bound[:, None])
    torch.testing.assert_close(x0, want_x0, rtol=0, atol=0)
    want = nxt_free + clipped.d[:, None].float() * (want_x0 - x0_free)
    torch.testing.assert_close(nxt, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nxt[1], nxt_free[1], rtol=1e-6, atol=1e-6)
    assert float((x0_free[0].abs() > 1).float().mean()) > 0.5
    # the clipped update never forms the unclipped x0 term: exact where x0 is huge (epsilon, alpha_bar 1e-6)
    huge = K.ddim_coefficients(torch.tensor([1e-6]), torch.tensor([0.5]), clip=1.0)
    x1, e1 = torch.full((1, 4), 3.0), torch.full((1, 4), 2.0)
    torch.testing.assert_close(K.denoise_step(x1, e1, huge)[0], torch.full((1, 4), 0.5 ** 0.5 + 0.5 ** 0.5 * 2.0))


# ---------------------------------------------------------------- in-kernel noise, reference side

def _seeds(n):
    from mmtts.core.rng import Streams

    return Streams.spawn(1234, n)


def test_noise_statistics_reference():
    streams = _seeds(4)
    n = 1 << 15
    z = K.philox_normal_reference(streams.seeds, streams.counters, n).double()
    assert z.abs().max() < 7
    for row in z:
        assert abs(float(row.mean())) < 5 / math.sqrt(n)
        assert abs(float(row.var()) - 1) < 5 * math.sqrt(2 / n)
        assert sstats.kstest(row.numpy(), "norm").pvalue > 1e-4
        assert abs(float(torch.corrcoef(torch.stack([row[:-1], row[1:]]))[0, 1])) < 5 / math.sqrt(n)
    corr = torch.corrcoef(z)
    assert (corr - torch.eye(4)).abs().max() < 5 / math.sqrt(n)  # candidates are independent


def test_philox_known_answers():
    """Philox-4x32-10 test vectors of its authors (Random123 kat_vectors), and the counter layout of the noise."""
    m = 0xFFFFFFFF
    vectors = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
               ((m, m, m, m), (m, m), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
               ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
                (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    counters = torch.tensor([v[0] for v in vectors]).T
    keys = torch.tensor([v[1] for v in vectors]).T
    words = philox.philox4x32(*counters, *keys)
    assert words.T.tolist() == [list(v[2]) for v in vectors]
    # element 4j + k of a draw is word k of the block at counter (j, offset low, offset high, 0), keyed by the seed
    seed, offset = torch.tensor([(0x299F31D0 << 32) | 0xA4093822]), torch.tensor([(0x13198A2E << 32) | 0x85A308D3])
    noise = K.philox_normal_reference(seed, offset, 12)[0]
    u = philox.words_to_uniform(philox.philox4x32(2, 0x85A308D3, 0x13198A2E, 0, 0xA4093822, 0x299F31D0))
    radius, theta = torch.sqrt(-2.0 * torch.log(u[0::2])), 2 * math.pi * u[1::2]
    want = torch.stack([radius * torch.cos(theta), radius * torch.sin(theta)], -1).reshape(4)  # Box-Muller pairs
    torch.testing.assert_close(noise[8:], want, rtol=1e-6, atol=1e-6)


def test_uniform_draws():
    streams = _seeds(3)
    u = K.philox_uniform_reference(streams.seeds, streams.counters, 1 << 15)
    assert u.dtype == torch.float64 and float(u.min()) >= 0 and float(u.max()) < 1
    for row in u:
        assert sstats.kstest(row.numpy(), "uniform").pvalue > 1e-4
    assert len(torch.unique(u)) == u.numel()  # 53 random bits: no repeats at this size
    alone = K.philox_uniform_reference(streams.seeds[2:], streams.counters[2:], 5)
    assert torch.equal(alone[0], u[2, :5])


def test_noise_is_a_function_of_seed_offset_and_index():
    streams = _seeds(5)
    seeds, offsets = streams.seeds, torch.tensor([0, 1, 2, 3, 2**33 + 5])
    full = K.philox_normal_reference(seeds, offsets, 1023)
    torch.testing.assert_close(K.philox_normal_reference(seeds, offsets, 1023), full, rtol=0, atol=0)
    alone = K.philox_normal_reference(seeds[3:4], offsets[3:4], 600)  # batch composition and length do not matter
    torch.testing.assert_close(alone[0], full[3, :600], rtol=0, atol=0)
    again = K.philox_normal_reference(seeds[:1].repeat(2), torch.tensor([0, 1]), 64)
    assert not torch.allclose(again[0], again[1])  # the next draw of a stream is fresh noise
    noise = K.candidate_noise(seeds, offsets, (3, 11, 31))
    assert noise.shape == (5, 3, 11, 31)
    torch.testing.assert_close(noise.reshape(5, -1), full, rtol=0, atol=0)


def test_in_step_noise_is_candidate_noise():
    x, out, _ = _data((3, 7, 9), torch.float32)
    zero, one = torch.zeros(3), torch.ones(3)
    streams = _seeds(3)
    x_next, _ = K.denoise_step(x, out, K.StepCoefficients(zero, zero, one, one, zero), seed=streams.seeds,
                               offset=streams.counters)
    torch.testing.assert_close(x_next, K.candidate_noise(streams.seeds, streams.counters, (7, 9)))


# ---------------------------------------------------------------- normalization against PyTorch

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batch_norm_matches_nn_batchnorm_over_train_and_eval(dtype):
    torch.manual_seed(0)
    c = 5
    bn = torch.nn.BatchNorm2d(c, momentum=0.2)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    bn = bn.to(dtype)
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    tol = {torch.float32: 1e-5, torch.float16: 4e-3}[dtype]
    batches = [torch.randn(4, c, 31, 33) * 2 + 1, torch.randn(1, c, 7, 9), torch.randn(3, c, 1, 1500) - 0.5]
    for train_x in batches:
        x = train_x.to(dtype)
        bn.train()
        want = bn(x)
        got = K.batch_norm(x, running_mean, running_var, bn.weight, bn.bias, training=True, momentum=0.2)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        torch.testing.assert_close(running_mean, bn.running_mean, rtol=tol, atol=tol)
        torch.testing.assert_close(running_var, bn.running_var, rtol=tol, atol=tol)  # unbiased variance
    bn.eval()
    for x in (torch.randn(2, c, 5, 1023).to(dtype), torch.randn(1, c, 3, 3).to(dtype)):
        torch.testing.assert_close(K.batch_norm(x, running_mean, running_var, bn.weight, bn.bias, training=False),
                                   bn(x), rtol=tol, atol=tol)


def test_batch_norm_1d_inputs_and_biased_stats():
    x = torch.randn(1023, 6) * 3
    s = K.batch_norm_stats(x)
    torch.testing.assert_close(s.var, x.var(0, unbiased=False))
    torch.testing.assert_close(s.unbiased_var, x.var(0, unbiased=True))
    bn = torch.nn.BatchNorm1d(6)
    torch.testing.assert_close(K.batch_norm(x, torch.zeros(6), torch.ones(6), bn.weight, bn.bias), bn(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stats_accumulate_in_float32(dtype):
    x = (torch.randn(2, 3, 1500) * 0.01 + 100).to(dtype)
    s = K.batch_norm_stats(x)
    assert s.mean.dtype == torch.float32
    ref = x.float()
    torch.testing.assert_close(s.var, ref.var((0, 2), unbiased=False), rtol=1e-4, atol=1e-6)


def test_gradients_match_autograd_of_functional_batch_norm():
    torch.manual_seed(1)
    x = torch.randn(3, 4, 11, 13, requires_grad=True)
    w = torch.rand(4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    dy = torch.randn(3, 4, 11, 13)
    grads = []
    for fn in (K.batch_norm, torch.nn.functional.batch_norm):
        y = fn(x, None, None, w, b, training=True)
        grads.append(torch.autograd.grad(y, (x, w, b), dy))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _alpha_bn_by_autograd(x, w, b, src_mean, src_var, alpha, exact, eps):
    var, mean = torch.var_mean(x, dim=(0, 2), unbiased=False)
    m = alpha * src_mean + (1 - alpha) * mean
    v = alpha * src_var + (1 - alpha) * var + (alpha * (1 - alpha) * (src_mean - mean) ** 2 if exact else 0)
    return (x - m[None, :, None]) / torch.sqrt(v[None, :, None] + eps) * w[None, :, None] + b[None, :, None]


@pytest.mark.parametrize("alpha,exact", [(0.0, True), (0.4, True), (0.4, False), (1.0, True)])
def test_alpha_batch_norm_gradients(alpha, exact):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    src_mean, src_var = torch.randn(4, generator=g, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5

    def ours(x, w, b):
        return K.batch_norm(x, src_mean, src_var, w, b, training=True, eps=1e-3, source_weight=alpha,
                            exact_mixture=exact)

    assert torch.autograd.gradcheck(ours, (x, w, b))
    dy = torch.randn(3, 4, 7, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(ours(x, w, b), (x, w, b), dy)
    want = torch.autograd.grad(_alpha_bn_by_autograd(x, w, b, src_mean, src_var, alpha, exact, 1e-3), (x, w, b), dy)
    for gt, wt in zip(got, want):
        torch.testing.assert_close(gt, wt)


def test_eval_mode_gradients():
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda *a: K.batch_norm(a[0], rm, rv, a[1], a[2], training=False), (x, w, b))


def test_exact_alpha_mix_is_the_pooled_variance():
    """With alpha = n_src / (n_src + n_batch), the exact mixture is the statistics of the pooled samples."""
    src, batch = torch.randn(300, 4, dtype=torch.float64) * 2 + 1, torch.randn(100, 4, dtype=torch.float64) - 1
    mean, var = K.alpha_mix(batch.mean(0), batch.var(0, unbiased=False), src.mean(0), src.var(0, unbiased=False),
                            alpha=0.75, exact=True)
    pooled = torch.cat([src, batch])
    torch.testing.assert_close(mean, pooled.mean(0))
    torch.testing.assert_close(var, pooled.var(0, unbiased=False))
    plain = K.alpha_mix(batch.mean(0), batch.var(0), src.mean(0), src.var(0), alpha=0.75, exact=False)[1]
    torch.testing.assert_close(plain, 0.75 * src.var(0) + 0.25 * batch.var(0))


def test_streaming_stats_merge_and_forget():
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(n, 3, 17, generator=g, dtype=torch.float64) * (i + 1) + i for i, n in enumerate((2, 5, 1))]
    stream = K.StreamingStats(forget=1.0)
    for xb in batches:
        merged = stream.update(xb)
    pooled = torch.cat(batches)
    torch.testing.assert_close(merged.mean, pooled.mean((0, 2)))
    torch.testing.assert_close(merged.var, pooled.var((0, 2), unbiased=False))
    assert merged.count == pooled.numel() // 3

    forget = 0.5
    stream = K.StreamingStats(forget=forget)
    for xb in batches:
        merged = stream.update(xb)
    weights = torch.cat([torch.full((xb.shape[0] * 17,), forget ** (len(batches) - 1 - i), dtype=torch.float64)
                         for i, xb in enumerate(batches)])
    values = torch.cat([xb.permute(1, 0, 2).reshape(3, -1) for xb in batches], dim=1)
    mean = (values * weights).sum(1) / weights.sum()
    var = (((values - mean[:, None]) ** 2) * weights).sum(1) / weights.sum()
    torch.testing.assert_close(merged.mean, mean)
    torch.testing.assert_close(merged.var, var)
    stream.reset()
    assert stream.stats is None


def test_normalize_affine_and_errors():
    x = torch.randn(2, 3, 1023)
    mean, var, w, b = torch.randn(3), torch.rand(3) + 0.1, torch.randn(3), torch.randn(3)
    want = (x - mean[:, None]) / torch.sqrt(var[:, None] + 1e-5) * w[:, None] + b[:, None]
    torch.testing.assert_close(K.normalize_affine(x, mean, var, w, b), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        K.normalize_affine(x, mean, var, torch.ones(4))
    with pytest.raises(ValueError, match="channels in dim 1"):
        K.batch_norm_stats(torch.randn(5))
    with pytest.raises(TypeError, match="floating-point"):
        K.batch_norm_stats(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        K.batch_norm(torch.randn(1, 3))
    with pytest.raises(ValueError, match="pass running_mean"):
        K.batch_norm(x, training=False)
    with pytest.raises(ValueError, match="cumulative average"):
        K.batch_norm(x, torch.zeros(3), torch.ones(3), momentum=None)
    with pytest.raises(ValueError, match="weight of the source"):
        K.alpha_mix(mean, var, mean, var, alpha=1.5)
    with pytest.raises(ValueError, match="forget"):
        K.StreamingStats(forget=0.0)


def test_alpha_bn_keeps_source_buffers():
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    before = rm.clone(), rv.clone()
    K.batch_norm(torch.randn(4, 3, 9), rm, rv, source_weight=0.5)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


# ---------------------------------------------------------------- dispatch

def test_dispatch_choices(monkeypatch):
    cpu = torch.zeros(3)
    monkeypatch.setenv("MMTTS_KERNELS", "auto")
    assert not use_triton(cpu)
    monkeypatch.setenv("MMTTS_KERNELS", "bogus")
    with pytest.raises(ValueError, match="MMTTS_KERNELS='bogus'"):
        use_triton(cpu)
    if not interpreting():
        monkeypatch.setenv("MMTTS_KERNELS", "triton")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            K.denoise_step(cpu[None], cpu[None], K.flow_match_coefficients([0.5], [0.4]))


def test_import_does_not_touch_triton_or_cuda():
    code = ("import sys, mmtts.kernels, torch; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not torch.cuda.is_initialized(), 'cuda initialized'")
    env = {k: v for k, v in os.environ.items() if k != "MMTTS_KERNELS"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_benchmark_script_dry_run(tmp_path):
    """The GPU benchmark runs end to end on the CPU (references only) and writes results in the benchmark shape."""
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels" / "run.py"
    env = {k: v for k, v in os.environ.items() if k not in ("MMTTS_KERNELS", "TRITON_INTERPRET")}
    subprocess.run([sys.executable, str(script), "--dry-run", "--repeats", "2", "--out", str(tmp_path)], check=True,
                   env=env, timeout=300, capture_output=True)
    results = json.loads((tmp_path / "kernels-dry-run.json").read_text())
    for key in ("task", "command", "created", "machine", "versions", "seeds", "rows"):
        assert key in results
    assert results["dry_run"] is True and (tmp_path / "kernels-dry-run.md").exists()
    ops = {r["detail"]["op"] for r in results["rows"]}
    assert ops == {"denoise_step", "batch_norm_stats", "alpha_bn", "normalize_affine", "batch_norm_train"}
    for row in results["rows"]:
        assert row["method"] in ("mmtts", "torch_eager") and row["metrics"]["ms"] > 0
        assert row["detail"]["agrees"], row


def test_benchmark_goal_check_and_table():
    """The parts of the benchmark only a GPU run reaches: goals on large inputs and the table with peak fractions."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels" / "run.py"
    spec = importlib.util.spec_from_file_location("kernel_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def row(method, op, elements, fraction, speedup):
        return {"method": method, "setting": f"{op} {elements}", "budget": None,
                "detail": {"op": op, "elements": elements, "agrees": True},
                "metrics": {"ms": 1.0, "ms_ci95": 0.1, "gbps": 4000.0 * fraction, "peak_fraction": fraction,
                            "speedup_vs_eager": speedup}}

    rows = [row("mmtts", "denoise_step", 1 << 26, 0.85, 2.5), row("torch_eager", "denoise_step", 1 << 26, 0.3, 1.0),
            row("mmtts", "alpha_bn", 1 << 26, 0.7, 1.2), row("mmtts", "alpha_bn", 1 << 10, 0.01, 0.1)]
    goals = bench.check_goals(rows)
    assert [(g["metric"], g["met"]) for g in goals] == [("peak_fraction", True), ("speedup_vs_eager", True),
                                                        ("speedup_vs_eager", False)]
    table = bench.markdown({"task": "kernels", "command": "c", "created": "t", "machine": {"cuda": "GPU"},
                            "versions": {}, "peak_gbps": 4000.0, "peak_source": "test", "rows": rows, "goals": goals})
    assert "| 85% | 2.50x | yes |" in table and "| NO |" in table


@pytest.mark.parametrize("kind,eta,clip", [("ddim", 0.0, False), ("ddim", 0.8, True), ("ddpm", None, True),
                                           ("ddpm", None, False), ("flow", 0.0, False)])
def test_the_image_schedule_table_is_coefficients_from_scheduler(kind, eta, clip):
    """The image Process's per-stage table and coefficients_from_scheduler agree on diffusers' own schedulers."""
    image = pytest.importorskip("mmtts.modalities.image.schedulers")
    if kind == "flow":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=eta is None)
    else:
        cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
        scheduler = cls(num_train_timesteps=1000, clip_sample=clip, prediction_type="v_prediction")
    schedule = image.schedule_from_scheduler(scheduler, 10, eta=eta)
    stage = torch.tensor([0, 9, 4])
    table = schedule.step_coefficients(stage)
    direct = K.coefficients_from_scheduler(scheduler, scheduler.timesteps[stage], eta=eta)
    for name, got, want in zip(K.StepCoefficients._fields, table, direct):
        assert (got is None) == (want is None), name
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
