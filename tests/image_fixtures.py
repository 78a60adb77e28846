"""Tiny diffusers models and pipelines built from configs with random weights (no downloads)."""

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMPipeline, DDPMScheduler, DiTPipeline,
                       DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel)


def tiny_unet(num_class_embeds=None, channels=1, size=8):
    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       num_class_embeds=num_class_embeds).eval()


def tiny_ddpm_pipeline(path):
    pipe = DDPMPipeline(unet=tiny_unet(num_class_embeds=11), scheduler=DDPMScheduler(num_train_timesteps=100))
    pipe.save_pretrained(path)
    return DDPMPipeline.from_pretrained(path)


def tiny_vae():
    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                         norm_num_groups=4, sample_size=16).eval()


def tiny_dit_pipeline(path):
    torch.manual_seed(2)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    pipe = DiTPipeline(transformer=dit, vae=tiny_vae(), scheduler=DDIMScheduler(num_train_timesteps=100),
                       id2label={i: f"class{i}" for i in range(10)})
    pipe.save_pretrained(path)
    return DiTPipeline.from_pretrained(path)


def tiny_text_unet():
    torch.manual_seed(3)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4,
                                cross_attention_dim=12, attention_head_dim=4).eval()
