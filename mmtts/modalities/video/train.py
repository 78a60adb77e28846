"""The frame-autoregressive moving-digit model trained here: a diffusers UNet2DModel with past frames as channels.

The model denoises one frame given the ``context`` frames before it, stacked
as extra input channels (most recent first); frames before the clip's start
are zeros, a value no real frame takes (the background is -1), which tells the
model that it draws the first frame. It has no class or motion conditioning:
search has to find the digit and the motion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...core.threads import one_thread
from ...tasks.training import adamw_one_cycle, fit, forward_diffusion, seeded_model
from .data import ClipSpec, moving_digits


def make_frame_unet(config: dict):
    """The UNet2DModel of ``config``: (1 + context) channels in, one frame out."""
    from diffusers import UNet2DModel
    w = config["width"]
    return UNet2DModel(sample_size=config["canvas"], in_channels=1 + config["context"], out_channels=1,
                       block_out_channels=(w, 2 * w), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)


def make_frame_scheduler():
    """The training noise schedule (read by the process through :func:`schedule_from_scheduler`)."""
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)


def spec_of(config: dict) -> ClipSpec:
    return ClipSpec(frames=config["frames"], canvas=config["canvas"], digit=config["digit"],
                    speeds=tuple(config["speeds"]))


def context_frames(video: torch.Tensor, frame: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` frames before ``frame[i]`` of each clip (B, k, H, W), most recent first, zeros before the start."""
    b, _, t, h, w = video.shape
    out = torch.zeros(b, k, h, w, dtype=video.dtype)
    for j in range(k):
        src = frame - 1 - j
        ok = src >= 0
        out[ok, j] = video[ok.nonzero()[:, 0], 0, src[ok]]
    return out


@one_thread()
def train_frame_model(config: dict) -> dict[str, torch.Tensor]:
    """Epsilon-prediction training on (frame, previous frames) pairs of moving-digit clips; the first frame is
    drawn with probability ``first_frame`` (it is the hardest: a whole digit from nothing)."""
    clips = moving_digits(spec_of(config), config["clips"], seed=config["seed"])["video"]
    model, g = seeded_model(lambda: make_frame_unet(config), config["seed"])
    abar = make_frame_scheduler().alphas_cumprod
    opt, sched = adamw_one_cycle(model, config["lr"], config["steps"])
    n, frames = len(clips), clips.shape[2]

    def loss_at(i: int) -> torch.Tensor:
        idx = torch.randint(0, n, (config["batch"],), generator=g)
        f = torch.randint(0, frames, (config["batch"],), generator=g)
        f[torch.rand(config["batch"], generator=g) < config["first_frame"]] = 0
        x0 = clips[idx, :, f]
        ctx = context_frames(clips[idx], f, config["context"])
        t, eps, xt = forward_diffusion(x0, abar, g)
        return F.mse_loss(model(torch.cat([xt, ctx], 1), t).sample, eps)

    fit(model, opt, sched, config["steps"], loss_at, "training the video-search frame model", every=50, clip=1.0)
    return model.eval().state_dict()
