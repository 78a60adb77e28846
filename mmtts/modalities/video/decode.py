"""Video latents to frames, a bounded number of frames per VAE call.

An image VAE decodes every frame on its own, so a clip can be decoded in
chunks of frames and the result is the same as one call over all of them;
memory then grows with the chunk, not with the clip's length and the
batch (a whole-video decode is where long-video pipelines run out of memory).
"""

from __future__ import annotations

import torch

from ...core.errors import MmttsError
from ..image.process import decode_latents


@torch.no_grad()
def decode_frames(latents: torch.Tensor, vae=None, *, scale: float = 1.0, chunk: int | None = 8,
                  output_range=(-1.0, 1.0)) -> torch.Tensor:
    """(B, C, T, H, W) latents to (B, C', T, H', W') frames in [0, 1] on the CPU (float32).

    Each chunk of ``chunk`` frames (over the whole batch; None: every frame at
    once) is decoded as images are (:func:`~mmtts.modalities.image.process.decode_latents`:
    without a VAE the latents are the pixels).
    """
    if latents.ndim != 5:
        raise MmttsError(f"video latents must be (batch, channels, frames, height, width); got {tuple(latents.shape)}")
    b, c, t, h, w = latents.shape
    if t == 0:
        raise MmttsError("cannot decode a clip of zero frames")
    if chunk is not None and chunk < 1:
        raise MmttsError(f"decode chunk={chunk} must be a positive number of frames, or None for all at once")
    flat = latents.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    step = max(len(flat), 1) if chunk is None else chunk
    img = torch.cat([decode_latents(part, vae, scale, output_range) for part in flat.split(step)])
    return img.reshape(b, t, *img.shape[1:]).permute(0, 2, 1, 3, 4)
