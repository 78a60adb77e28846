"""Schedules against diffusers' own schedulers (a step is the kernels' denoise_step), and the re-noising transition."""

import dataclasses
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from mmtts import kernels
from mmtts.core import MmttsError
from mmtts.modalities.image import schedule_from_scheduler
from mmtts.strategies.zero_order import sphere_neighbours

SHAPE = (3, 2, 5, 7)  # odd sizes


def stage(i):
    return torch.full((SHAPE[0],), i)


def step(s, out, x, st, z):
    """What ImageProcess.step does with the model output: (x_next, x0, the std of the noise added)."""
    nxt, x0 = kernels.denoise_step(x, out, s.step_coefficients(st), z=z)
    return nxt, x0, s.noise_std(st)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
def test_ddim_step_equals_diffusers(pred, clip, eta):
    torch.manual_seed(0)
    sch = DDIMScheduler(num_train_timesteps=1000, prediction_type=pred, clip_sample=clip, beta_schedule="scaled_linear")
    s = schedule_from_scheduler(sch, 20, eta=eta)
    for i in (0, 7, 19):
        x, out, z = torch.randn(SHAPE), torch.randn(SHAPE) * 2, torch.randn(SHAPE)
        ref = sch.step(out, sch.timesteps[i], x, eta=eta, variance_noise=z).prev_sample
        got, x0, sigma = step(s, out, x, stage(i), z if eta > 0 else None)
        assert torch.allclose(got, ref, atol=2e-5, rtol=1e-5), (i, (got - ref).abs().max())
        ref_x0 = sch.step(out, sch.timesteps[i], x, eta=eta, variance_noise=z).pred_original_sample
        assert torch.allclose(x0, ref_x0, atol=2e-5)
        assert bool((sigma == 0).all()) == (eta == 0 or i == 19)  # the last step lands on alpha = 1


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddpm_step_equals_diffusers(pred):
    torch.manual_seed(1)
    sch = DDPMScheduler(num_train_timesteps=1000, prediction_type=pred)
    s = schedule_from_scheduler(sch, 25)
    assert s.update == "ddpm" and s.clip_sample == 1.0
    for i in (0, 12, 24):
        x, out = torch.randn(SHAPE), torch.randn(SHAPE)
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
        ref = sch.step(out, sch.timesteps[i], x, generator=torch.Generator().manual_seed(i)).prev_sample
        got, _, _ = step(s, out, x, stage(i), z)
        assert torch.allclose(got, ref, atol=2e-5), (i, (got - ref).abs().max())


def test_ddpm_fp16_matches_within_half_precision():
    sch = DDPMScheduler(num_train_timesteps=1000)
    s = schedule_from_scheduler(sch, 10)
    x, out = torch.randn(SHAPE).half(), torch.randn(SHAPE).half()
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    ref = sch.step(out.float(), sch.timesteps[4], x.float(), generator=torch.Generator().manual_seed(3)).prev_sample
    got, _, _ = step(s, out, x, stage(4), z.half())
    assert got.dtype == torch.float16
    assert torch.allclose(got.float(), ref, atol=5e-3)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_matching_deterministic_step_is_diffusers_euler(shift):
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    s = schedule_from_scheduler(sch, 12)
    assert s.prediction == "flow" and not s.stochastic
    for i in (0, 6, 11):
        x, v = torch.randn(SHAPE), torch.randn(SHAPE)
        sch._step_index = i
        ref = sch.step(v, sch.timesteps[i], x).prev_sample
        got, x0, _ = step(s, v, x, stage(i), None)
        assert torch.allclose(got, ref, atol=1e-5)
        assert torch.allclose(x0, x - sch.sigmas[i] * v, atol=1e-5)


def test_flow_sde_keeps_the_marginals():
    """With x_t drawn from the model's marginal and the exact velocity, the stochastic step lands on its marginal."""
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    s = schedule_from_scheduler(sch, 10, eta=1.0)
    n, i = 200_000, 3
    x0 = torch.full((n, 1, 1, 1), 0.7, dtype=torch.float64)
    eps = torch.randn(n, 1, 1, 1, dtype=torch.float64)
    x = (s.alpha[i] * x0 + s.sigma[i] * eps).float()
    v = (eps - x0).float()  # exact velocity for a point mass at 0.7
    nxt, _, sigma = step(s, v, x, torch.full((n,), i), torch.randn(n, 1, 1, 1))
    assert float(sigma[0]) > 0
    assert float(nxt.mean()) == pytest.approx(float(s.alpha[i + 1] * 0.7), abs=5e-3)
    assert float(nxt.std()) == pytest.approx(float(s.sigma[i + 1]), rel=5e-3)


def test_renoise_has_the_forward_marginal_variance():
    sch = DDIMScheduler(num_train_timesteps=1000)
    s = schedule_from_scheduler(sch, 20)
    n = 200_000
    x0 = torch.randn(n, 1, 1, 1, dtype=torch.float64) * 0.5 + 0.3
    i, j = 12, 9
    xi = s.alpha[i] * x0 + s.sigma[i] * torch.randn_like(x0)
    xj = s.renoise(xi, torch.full((n,), i), torch.full((n,), j), torch.randn_like(x0))
    # x_j = alpha_j x0 + sigma_j eps: mean alpha_j * 0.3, variance alpha_j^2 0.25 + sigma_j^2
    assert float(xj.mean()) == pytest.approx(float(s.alpha[j]) * 0.3, abs=4e-3)
    assert float(xj.var()) == pytest.approx(float(s.alpha[j] ** 2 * 0.25 + s.sigma[j] ** 2), rel=1e-2)
    # and its residual given x0 has exactly sigma_j^2 variance
    assert float((xj - s.alpha[j] * x0).var()) == pytest.approx(float(s.sigma[j] ** 2), rel=1e-2)
    with pytest.raises(MmttsError, match="earlier"):
        s.renoise(xi[:2], torch.full((2,), i), torch.full((2,), i + 1), torch.randn(2, 1, 1, 1))


def test_zero_order_neighbours_lie_on_the_sphere():
    pivot = torch.randn(1, 4, 6, 5)
    d = pivot.numel()
    nb = sphere_neighbours(pivot, torch.randn(64, 4, 6, 5), radius=0.3)
    dist = (nb - pivot).reshape(64, -1).norm(dim=1)
    assert torch.allclose(dist, torch.full((64,), 0.3 * math.sqrt(d)), rtol=1e-5)
    # and they keep the pivot's norm, so repeated moves do not walk the noise off its shell
    norms = nb.reshape(64, -1).norm(dim=1)
    assert torch.allclose(norms, pivot.norm().expand(64), rtol=1e-5)
    # directions are spread out: the mean offset is much shorter than the radius
    assert float((nb - pivot).mean(0).norm()) < 0.3 * 0.3 * math.sqrt(d)


def test_bad_scheduler_settings():
    with pytest.raises(MmttsError, match="at least 1"):
        schedule_from_scheduler(DDIMScheduler(), 0)
    from diffusers import EulerDiscreteScheduler
    with pytest.raises(MmttsError, match="not supported"):
        schedule_from_scheduler(EulerDiscreteScheduler(), 5)


@pytest.mark.parametrize("steps", [4, 7, 10, 50])
def test_ddim_linspace_is_refused_with_its_reason(steps):
    """DDIM steps t to t - T // n, which linspace spacing does not feed the model next (4, 10, 50 divide 1000 too)."""
    with pytest.raises(MmttsError, match=r"linspace.*not the\s+next timestep.*'leading'"):
        schedule_from_scheduler(DDIMScheduler(num_train_timesteps=1000, timestep_spacing="linspace"), steps)
    assert schedule_from_scheduler(DDIMScheduler(num_train_timesteps=1000, timestep_spacing="leading"), steps)
    trailing = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    if 1000 % steps == 0:
        assert schedule_from_scheduler(trailing, steps).num_stages == steps
    else:  # trailing timesteps are 1000 / n apart, rounded; DDIM still steps by 1000 // n
        with pytest.raises(MmttsError, match="divides num_train_timesteps=1000"):
            schedule_from_scheduler(trailing, steps)


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
def test_thresholding_is_refused(cls):
    with pytest.raises(MmttsError, match="thresholding=False"):
        schedule_from_scheduler(cls(num_train_timesteps=1000, thresholding=True), 10)


def test_ddpm_settings_it_cannot_follow_are_refused():
    with pytest.raises(MmttsError, match="no eta"):
        schedule_from_scheduler(DDPMScheduler(num_train_timesteps=1000), 10, eta=0.5)
    assert schedule_from_scheduler(DDPMScheduler(num_train_timesteps=1000), 10, update="ddim", eta=0.5).eta == 0.5
    for variance in ("learned", "learned_range", "fixed_large_log"):
        with pytest.raises(MmttsError, match=variance):
            schedule_from_scheduler(DDPMScheduler(num_train_timesteps=1000, variance_type=variance), 10)


def test_ddpm_fixed_large_noise_is_the_step_beta():
    """variance_type='fixed_large' is read: at t = 100 of 10 steps the std is sqrt(beta), not the posterior's."""
    sch = DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_large", clip_sample=False)
    s = schedule_from_scheduler(sch, 10)
    i = int((sch.timesteps == 100).nonzero())
    abar = sch.alphas_cumprod.double()
    assert float(s.noise_std(torch.tensor([i]))) == pytest.approx(float((1 - abar[100] / abar[0]).sqrt()), rel=1e-6)
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    ref = sch.step(out, sch.timesteps[i], x, generator=torch.Generator().manual_seed(5)).prev_sample
    got, _, _ = step(s, out, x, stage(i), z)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_trailing_last_step_adds_noise(variance_type):
    """Trailing spacing ends at t = 99 > 0, where diffusers still adds noise (only t = 0 adds none)."""
    from mmtts import kernels as K

    sch = DDPMScheduler(num_train_timesteps=1000, timestep_spacing="trailing", variance_type=variance_type,
                        clip_sample=False)
    s = schedule_from_scheduler(sch, 10)
    last = torch.tensor([9])
    assert int(s.timesteps[9]) == 99
    coefs = K.coefficients_from_scheduler(sch, sch.timesteps[9:])
    want = float((1 - sch.alphas_cumprod.double()[99]).sqrt()) if variance_type == "fixed_large" else 1e-10
    assert float(s.noise_std(last)) == pytest.approx(want, rel=1e-6)
    assert float(coefs.c[0]) == pytest.approx(want, rel=1e-6)
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    ref = sch.step(out, sch.timesteps[9], x, generator=torch.Generator().manual_seed(9)).prev_sample
    got, _, _ = step(s, out, x, stage(9), z)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def test_flow_matching_stochastic_sampling_steps_as_diffusers():
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, stochastic_sampling=True)
    s = schedule_from_scheduler(sch, 8)
    assert s.update == "euler" and s.eta == 1.0 and s.stochastic
    for i in (0, 5, 7):
        x, v = torch.randn(SHAPE), torch.randn(SHAPE)
        sch._step_index = i
        ref = sch.step(v, sch.timesteps[i], x, generator=torch.Generator().manual_seed(i)).prev_sample
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
        got, _, _ = step(s, v, x, stage(i), z)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    with pytest.raises(MmttsError, match="stochastic_sampling=True"):
        schedule_from_scheduler(sch, 8, eta=0.5)
    with pytest.raises(MmttsError, match="stochastic_sampling=True"):
        schedule_from_scheduler(sch, 8, update="ddim")


def test_float64_end_to_end(monkeypatch):
    """float64 latents step in float64 (always the reference, even with kernels forced) and agree with float32."""
    from mmtts import kernels as K
    from mmtts.core import Streams
    from mmtts.modalities.image import ImageProcess

    s = schedule_from_scheduler(DDIMScheduler(num_train_timesteps=100, clip_sample=True), 4, eta=1.0)
    x, out, z = (torch.randn(SHAPE, dtype=torch.float64) for _ in range(3))
    coefs = s.step_coefficients(torch.tensor([0, 1, 3]))
    monkeypatch.setenv("MMTTS_KERNELS", "triton")
    got = K.denoise_step(x, out, coefs, z=z)
    monkeypatch.setenv("MMTTS_KERNELS", "auto")
    want = K.denoise_step_reference(x, out, coefs, z=z)
    assert got[0].dtype == torch.float64 and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    model = lambda x, t, c: 0.6 * x - 0.002 * t.reshape(-1, 1, 1, 1).to(x.dtype)  # noqa: E731
    outs = {}
    for dtype in (torch.float64, torch.float32):
        proc = ImageProcess(model, s, (1, 4, 3), dtype=dtype)
        st = proc.perturb(proc.init(Streams.spawn(0, 3)), 0.3)
        while int(st.stage.min()) < proc.num_stages:
            st = proc.step(st)
        assert st.data["x"].dtype == dtype and st.data["x0"].dtype == dtype
        outs[dtype] = st.data["x"]
    torch.testing.assert_close(outs[torch.float32], outs[torch.float64].float(), rtol=1e-5, atol=1e-5)


def test_one_definition_of_the_step():
    """The image Process, its schedules and the kernels package all call the same denoise_step."""
    from mmtts.kernels import denoise as denoise_module
    from mmtts.modalities.image import process

    assert process.denoise_step is kernels.denoise_step is denoise_module.denoise_step
    assert kernels.denoise_step_reference is denoise_module.denoise_step_reference


def test_cpu_step_runs_the_kernel_reference(monkeypatch):
    """On CPU tensors ImageProcess.step goes through denoise_step to denoise_step_reference, its only formula."""
    from mmtts.kernels import denoise as denoise_module
    from mmtts.modalities.image import ImageProcess
    from mmtts.core import Streams

    calls = []
    reference = denoise_module.denoise_step_reference
    monkeypatch.setattr(denoise_module, "denoise_step_reference", lambda *a, **k: calls.append(1) or reference(*a, **k))
    s = schedule_from_scheduler(DDIMScheduler(num_train_timesteps=100), 4, eta=1.0)
    proc = ImageProcess(lambda x, t, c: 0.5 * x, s, (1, 3, 5))
    proc.step(proc.init(Streams.spawn(0, 3)))
    assert calls == [1]


@pytest.mark.parametrize("kind", ["ddim", "ddpm", "flow"])
def test_step_coefficients_of_mixed_stages(kind):
    """Candidates at different stages get their own stage's coefficients (the schedule's table, row by row)."""
    sch = {"ddim": DDIMScheduler(num_train_timesteps=1000), "ddpm": DDPMScheduler(num_train_timesteps=1000),
           "flow": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)}[kind]
    s = schedule_from_scheduler(sch, 10, eta=0.8 if kind != "ddpm" else 0.0)
    x, out, z = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    st = torch.tensor([0, 4, 9])
    got, got_x0, _ = step(s, out, x, st, z)
    for row, i in enumerate(st.tolist()):
        one, one_x0, _ = step(s, out[row:row + 1], x[row:row + 1], torch.tensor([i]), z[row:row + 1])
        assert torch.equal(got[row:row + 1], one) and torch.equal(got_x0[row:row + 1], one_x0)
    with pytest.raises(MmttsError, match="outside"):
        s.step_coefficients(torch.tensor([10]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.eta = 0.5  # frozen: the coefficient table cannot go stale
