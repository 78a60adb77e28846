"""The image Process on tiny diffusers models: pipeline loading, equality with diffusers, cost accounting."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler

import mmtts
from mmtts.core import FunctionVerifier, MmttsError, Streams
from mmtts.modalities.image import ImageProcess, schedule_from_scheduler

from image_fixtures import tiny_ddpm_pipeline, tiny_dit_pipeline, tiny_text_unet, tiny_unet

MEAN = FunctionVerifier(lambda x: x.mean((1, 2, 3)), name="brightness")


class CountingModel(torch.nn.Module):
    """Counts candidate forwards (batch elements) through a wrapped model."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.forwards, self.config = inner, 0, inner.config

    def forward(self, x, t, c):
        self.forwards += x.shape[0]
        return self.inner(x, t, class_labels=c).sample


def test_deterministic_loop_equals_the_diffusers_pipeline(tmp_path):
    unet = tiny_unet()
    sched = DDIMScheduler(num_train_timesteps=100)
    pipe = DDIMPipeline(unet=unet, scheduler=sched)
    pipe.save_pretrained(tmp_path)
    pipe = DDIMPipeline.from_pretrained(tmp_path)
    ref = pipe(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=10, eta=0.0,
               output_type="np").images
    proc = ImageProcess.from_pipeline(pipe, num_inference_steps=10, eta=0.0)
    st = proc.init(Streams.spawn(0, 1))
    st = proc.with_latent(st, torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(0)))
    while int(st.stage[0]) < proc.num_stages:
        st = proc.step(st)
    ours = proc.finish(st).permute(0, 2, 3, 1).numpy()
    assert abs(ours - ref).max() < 1e-4


@pytest.mark.parametrize("guidance, per_stage", [(1.0, 1), (3.0, 2)])
def test_nfe_counted_equals_forwards_made(tmp_path, guidance, per_stage):
    pipe = tiny_ddpm_pipeline(tmp_path)
    sched = schedule_from_scheduler(pipe.scheduler, 6)
    model = CountingModel(pipe.unet)
    proc = ImageProcess(model, sched, (1, 8, 8), cond=4, uncond=10, guidance_scale=guidance)
    assert proc.nfe_per_candidate() == 6 * per_stage
    for strategy, kw in [("best-of-n", {}), ("particle-filter", {}), ("beam", {"beams": 2}),
                         ("paths", {"width": 2}), ("evosearch", {"population": 3}), ("zero-order", {"neighbours": 2})]:
        model.forwards = 0
        r = mmtts.search(proc, MEAN, strategy, budget=6 * per_stage * 5, seed=0, **kw)
        assert r.budget["nfe"] == model.forwards <= 6 * per_stage * 5, strategy


def test_from_pipeline_with_guidance_and_class_context(tmp_path):
    pipe = tiny_ddpm_pipeline(tmp_path)
    proc = ImageProcess.from_pipeline(pipe, num_inference_steps=5, class_label=3, guidance_scale=2.0)
    assert proc.nfe_per_stage == 2 and int(proc.uncond) == 10  # the null class of an 11-embedding unet
    seen = {}

    def score(x, ctx):
        seen["ctx"] = ctx
        return x.mean((1, 2, 3))

    r = mmtts.search(proc, FunctionVerifier(score, takes_context=True), "best-of-n", budget=30, seed=1)
    assert r.outputs.shape == (1, 1, 8, 8) and 0 <= float(r.outputs.min()) <= float(r.outputs.max()) <= 1
    assert seen["ctx"]["label"].tolist() == [3, 3, 3]
    with pytest.raises(MmttsError, match="needs uncond"):
        ImageProcess(pipe.unet, proc.schedule, (1, 8, 8), cond=3, guidance_scale=2.0)


def test_latent_pipeline_counts_decodes(tmp_path):
    pipe = tiny_dit_pipeline(tmp_path)
    proc = ImageProcess.from_pipeline(pipe, num_inference_steps=4, class_label=2, guidance_scale=1.5, eta=0.5)
    assert proc.sample_shape == (4, 8, 8) and proc.decodes_on_preview
    r = mmtts.search(proc, MEAN, "particle-filter", budget=2 * 4 * 3, seed=0)
    assert r.outputs.shape == (1, 3, 16, 16)
    assert r.budget["decodes"] == 3 * 4  # one decode per particle per stage (previews, then the final)
    assert r.budget["seconds"]["decode"] > 0


def test_text_conditioned_unet_with_prompt_embeds():
    pipe = SimpleNamespace(unet=tiny_text_unet(), scheduler=DDIMScheduler(num_train_timesteps=100), vae=None)
    emb, neg = torch.randn(1, 3, 12), torch.zeros(1, 3, 12)
    proc = ImageProcess.from_pipeline(pipe, num_inference_steps=3, prompt_embeds=emb, negative_prompt_embeds=neg,
                                      guidance_scale=4.0)
    r = mmtts.search(proc, MEAN, "best-of-n", budget=12, seed=0)
    assert r.outputs.shape == (1, 4, 8, 8) and r.budget["nfe"] == 12
    with pytest.raises(MmttsError, match="prompt_embeds"):
        ImageProcess.from_pipeline(pipe, num_inference_steps=3, prompt="a cat")


def test_a_nan_model_names_the_step():
    unet = tiny_unet()

    def model(x, t, c):
        out = unet(x, t).sample
        return out * float("nan") if int(t[0]) == sched.timesteps[3] else out

    sched = schedule_from_scheduler(DDPMScheduler(num_train_timesteps=100), 6)
    proc = ImageProcess(model, sched, (1, 8, 8))
    with pytest.raises(MmttsError, match=r"NaN/inf at denoising step 3 \(timestep"):
        mmtts.search(proc, MEAN, "best-of-n", budget=18, seed=0)


def test_evosearch_with_one_generation_is_best_of_n():
    proc = ImageProcess(tiny_unet(), schedule_from_scheduler(DDIMScheduler(num_train_timesteps=100), 4), (1, 8, 8))
    evo = mmtts.search(proc, MEAN, "evosearch", population=5, noise_generations=1, stages=[], budget=20, seed=3)
    bon = mmtts.search(proc, MEAN, "best-of-n", n=5, budget=20, seed=3)
    assert torch.equal(evo.outputs, bon.outputs) and evo.best_score == bon.best_score


def test_perturb_keeps_initial_noise_standard_normal():
    proc = ImageProcess(tiny_unet(), schedule_from_scheduler(DDIMScheduler(num_train_timesteps=100), 4), (1, 8, 8))
    st = proc.init(Streams.spawn(0, 2000))
    moved = proc.perturb(st, 0.2)
    x = moved.data["x"]
    assert abs(float(x.std()) - 1.0) < 0.01
    corr = float((x * st.data["x"]).mean())
    assert corr == pytest.approx((1 - 0.2 ** 2) ** 0.5, abs=0.01)


@pytest.mark.parametrize("eta,kind", [(0.0, DDIMScheduler), (1.0, DDIMScheduler), (0.0, DDPMScheduler)])
def test_perturb_equals_its_formula_at_mixed_stages(eta, kind):
    """Candidates at stage 0 mix the noise, later ones move by scale * sigma_t (float32, the streams' noise)."""
    proc = ImageProcess(tiny_unet(), schedule_from_scheduler(kind(num_train_timesteps=100), 5, eta=eta), (1, 8, 8))
    stages = torch.tensor([0, 3, 1, 0, 4, 5, 2])
    s = proc.schedule
    want_std = s.noise_std(stages.clamp(max=4)) if s.stochastic else s.posterior_std(stages.clamp(max=4))
    assert torch.equal(proc.mutation_std(stages.clamp(max=4)), want_std)
    def state(st_stage):
        st = proc.init(Streams.spawn(1, 7))
        st.stage = st_stage
        return st

    for st_stage in (stages, torch.zeros(7, dtype=torch.int64), stages.clamp(min=1)):
        st = state(st_stage)
        z = st.streams.clone().randn((1, 8, 8))
        x, b = st.data["x"], 0.3
        sig = proc.mutation_std(st_stage.clamp(max=4)).float().reshape(-1, 1, 1, 1)
        start = (st_stage == 0).reshape(-1, 1, 1, 1)
        want = torch.where(start, (1 - b ** 2) ** 0.5 * x + b * z, x + b * sig * z)
        got = proc.perturb(st, 0.3).data["x"]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        scales = torch.full((7,), 0.3, dtype=torch.float64)  # one per candidate
        per_candidate = proc.perturb(state(st_stage), scales).data["x"]
        assert torch.equal(per_candidate, got)
