"""A diffusers text-to-video pipeline (tiny random config, saved and loaded back) searched through VideoProcess."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, TextToVideoSDPipeline, UNet3DConditionModel

import mmtts
from mmtts.core import FunctionVerifier, MmttsError, Streams
from mmtts.modalities.video import VideoProcess

from image_fixtures import tiny_ddpm_pipeline, tiny_vae

MEAN = FunctionVerifier(lambda v: v.mean((1, 2, 3, 4)), name="brightness")


def tiny_video_pipeline(path):
    torch.manual_seed(0)
    unet = UNet3DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), norm_num_groups=4,
                                cross_attention_dim=12, attention_head_dim=4).eval()
    pipe = TextToVideoSDPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet,
                                 scheduler=DDIMScheduler(num_train_timesteps=100))
    pipe.save_pretrained(path)
    return TextToVideoSDPipeline.from_pretrained(path, text_encoder=None, tokenizer=None)  # embeddings are passed


def embeds():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 5, 12, generator=g), torch.randn(1, 5, 12, generator=g)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_from_pipeline_gives_the_pipelines_own_output(tmp_path, guidance):
    pipe = tiny_video_pipeline(tmp_path)
    emb, neg = embeds()
    latents = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, num_frames=3, num_inference_steps=5,
               guidance_scale=guidance, latents=latents.clone(), output_type="pt").frames  # (B, T, C, H, W)
    proc = VideoProcess.from_pipeline(pipe, num_frames=3, num_inference_steps=5, prompt_embeds=emb,
                                      negative_prompt_embeds=neg, guidance_scale=guidance, decode_chunk=2)
    assert proc.sample_shape == (4, 3, 8, 8) and proc.nfe_per_stage == (2 if guidance != 1 else 1)
    st = proc.with_latent(proc.init(Streams.spawn(0, 1)), latents.clone())
    for _ in range(proc.num_stages):
        st = proc.step(st)
    ours = proc.finish(st)
    assert ours.shape == (1, 3, 3, 16, 16)
    assert float((ours.transpose(1, 2) - ref).abs().max()) < 1e-4


def test_a_pipeline_searches_with_its_forwards_counted(tmp_path):
    pipe = tiny_video_pipeline(tmp_path)
    emb, neg = embeds()
    proc = VideoProcess.from_pipeline(pipe, num_frames=2, num_inference_steps=3, prompt_embeds=emb,
                                      negative_prompt_embeds=neg, guidance_scale=2.0, eta=1.0)
    rows = []
    pipe.unet.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0]))
    r = mmtts.search(proc, MEAN, "particle-filter", budget=6 * 3, seed=0)
    assert r.budget["nfe"] == sum(rows) == 18 and r.budget["decodes"] >= 3


def test_unsupported_pipelines_and_schedulers_are_refused(tmp_path):
    pipe = tiny_video_pipeline(tmp_path / "video")
    emb, _ = embeds()
    multistep = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(MmttsError, match="DPMSolverMultistepScheduler is not supported.*DDIMScheduler.from_config"):
        VideoProcess.from_pipeline(pipe, scheduler=multistep, prompt_embeds=emb, num_frames=2)
    with pytest.raises(MmttsError, match="UNet3DConditionModel"):
        VideoProcess.from_pipeline(tiny_ddpm_pipeline(tmp_path / "image"), num_frames=2)
    with pytest.raises(MmttsError, match="num_frames"):
        VideoProcess.from_pipeline(pipe, num_frames=0, prompt_embeds=emb)
    with pytest.raises(MmttsError, match="prompt_embeds"):
        VideoProcess.from_pipeline(pipe, num_frames=2, prompt="a digit")  # this pipeline has no text encoder
