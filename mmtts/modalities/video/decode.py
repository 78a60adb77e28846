"""Video latents to frames, a bounded number of frames per VAE call.

An image VAE decodes every frame on its own, so a clip can be decoded in
chunks of frames and the result is the same as one call over all of them;
memory then grows with the chunk, not with the clip's length and the
batch (a whole-video decode is where long-video pipelines run out of memory).
"""

from __future__ import annotations

import torch

from ...core.errors import MmttsError


@torch.no_grad()
def decode_frames(latents: torch.Tensor, vae=None, *, scale: float = 1.0, chunk: int | None = 8,
                  output_range=(-1.0, 1.0)) -> torch.Tensor:
    """(B, C, T, H, W) latents to (B, C', T, H', W') frames in [0, 1] on the CPU (float32).

    Without a VAE the latents are the pixels. ``chunk`` frames (over the whole
    batch) go through the VAE per call; None decodes every frame at once.
    """
    if latents.ndim != 5:
        raise MmttsError(f"video latents must be (batch, channels, frames, height, width); got {tuple(latents.shape)}")
    b, c, t, h, w = latents.shape
    if t == 0:
        raise MmttsError("cannot decode a clip of zero frames")
    if chunk is not None and chunk < 1:
        raise MmttsError(f"decode chunk={chunk} must be a positive number of frames, or None for all at once")
    if vae is None:
        frames = latents
    else:
        flat = latents.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w) / scale
        step = len(flat) if chunk is None else chunk
        parts = [vae.decode(part).sample for part in flat.split(step)]
        img = torch.cat(parts)
        frames = img.reshape(b, t, *img.shape[1:]).permute(0, 2, 1, 3, 4)
    lo, hi = output_range
    return ((frames.float() - lo) / (hi - lo)).clamp(0, 1).cpu()
