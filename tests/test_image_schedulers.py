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
    """With x_t drawn from the model's marginal and the exact velocity, the stochastic step lands on the next marginal."""
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
    with pytest.raises(MmttsError, match="not contiguous"):
        schedule_from_scheduler(DDIMScheduler(num_train_timesteps=1000, timestep_spacing="linspace"), 7)
    with pytest.raises(MmttsError, match="at least 1"):
        schedule_from_scheduler(DDIMScheduler(), 0)
    from diffusers import EulerDiscreteScheduler
    with pytest.raises(MmttsError, match="not supported"):
        schedule_from_scheduler(EulerDiscreteScheduler(), 5)


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
