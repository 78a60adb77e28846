"""A multi-scale residual VQ tokenizer: an image becomes one token map per scale, coarse to fine.

The encoder maps an image to a feature map f (code_dim x latent x latent).
Scale k quantizes what the earlier scales left unexplained: the residual is
area-downsampled to s_k x s_k, each position takes its nearest codebook entry,
and the looked-up codes are upsampled back to the latent size and refined by a
small shared convolution (``phi``). Their sum over scales is f-hat, which the
decoder turns back into pixels; the partial sum after scale k is what a VAR
preview decodes. One codebook serves every scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def upsample(z: torch.Tensor, size: int) -> torch.Tensor:
    """Codes of a scale brought to the latent size (bicubic; identity at full size)."""
    if z.shape[-1] == size:
        return z
    return F.interpolate(z, size=(size, size), mode="bicubic", align_corners=False)


def downsample(f: torch.Tensor, size: int) -> torch.Tensor:
    """A latent map averaged down to ``size`` x ``size`` (identity at full size)."""
    if f.shape[-1] == size:
        return f
    return F.interpolate(f, size=(size, size), mode="area")


class MultiScaleVQ(nn.Module):
    """Encoder, shared codebook, per-scale residual quantization and decoder.

    Args:
        scales: side of each scale's token map, coarse to fine; the last is the latent size.
        vocab: codebook entries.
        code_dim: channels of the latent and of each codebook entry.
        width: channels of the convolutional encoder and decoder.
        image_size: side of the (one-channel) images; the latent is image_size / 4.
    """

    def __init__(self, scales=(1, 2, 3, 4, 6, 8), vocab: int = 64, code_dim: int = 16, width: int = 32,
                 image_size: int = 32):
        super().__init__()
        self.scales = tuple(int(s) for s in scales)
        self.latent = image_size // 4
        if list(self.scales) != sorted(set(self.scales)) or self.scales[-1] != self.latent:
            raise ValueError(f"scales {self.scales} must increase strictly and end at the latent size {self.latent}")
        self.vocab, self.code_dim, self.image_size = vocab, code_dim, image_size
        self.encoder = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, code_dim, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(code_dim, 2 * width, 3, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 1, 3, padding=1))
        self.codebook = nn.Embedding(vocab, code_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / vocab, 1.0 / vocab)
        self.phi = nn.Conv2d(code_dim, code_dim, 3, padding=1)

    def lookup(self, idx: torch.Tensor, size: int) -> torch.Tensor:
        """Token ids (B, size*size) to this scale's contribution to f-hat (B, code_dim, latent, latent)."""
        z = self.codebook(idx).reshape(idx.shape[0], size, size, self.code_dim).permute(0, 3, 1, 2)
        z = upsample(z, self.latent)
        return 0.5 * z + 0.5 * self.phi(z)

    def nearest(self, r: torch.Tensor) -> torch.Tensor:
        """Nearest codebook entry of every position of r (B, code_dim, s, s): ids (B, s*s)."""
        flat = r.permute(0, 2, 3, 1).reshape(-1, self.code_dim)
        d = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.weight.T
             + self.codebook.weight.pow(2).sum(1)[None])
        return d.argmin(1).reshape(r.shape[0], -1)

    def quantize(self, f: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Token ids per scale and f-hat, the sum of every scale's contribution."""
        rest, fhat, ids = f, torch.zeros_like(f), []
        for s in self.scales:
            idx = self.nearest(downsample(rest, s))
            part = self.lookup(idx, s)
            fhat, rest = fhat + part, rest - part
            ids.append(idx)
        return ids, fhat

    def next_inputs(self, ids: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing inputs of scales 1..K-1: f-hat of the earlier scales downsampled to each scale's size,
        (B, tokens of scales 1..K-1, code_dim)."""
        fhat, out = None, []
        for k, s in enumerate(self.scales[:-1]):
            part = self.lookup(ids[k], s)
            fhat = part if fhat is None else fhat + part
            nxt = self.scales[k + 1]
            out.append(downsample(fhat, nxt).flatten(2).transpose(1, 2))
        return torch.cat(out, 1)

    @torch.no_grad()
    def restart_dead_codes(self, f: torch.Tensor, generator: torch.Generator, every: bool = False) -> int:
        """Re-seed codebook entries no scale of the batch ``f`` uses (``every``: all entries) with random residual
        vectors of that batch (a collapsed codebook otherwise stays collapsed); returns how many were re-seeded."""
        rest, used, seen = f, torch.zeros(self.vocab, dtype=torch.bool), []
        for s in self.scales:
            r = downsample(rest, s)
            idx = self.nearest(r)
            used[idx.unique()] = True
            seen.append(r.permute(0, 2, 3, 1).reshape(-1, self.code_dim))
            rest = rest - self.lookup(idx, s)
        dead = torch.arange(self.vocab) if every else (~used).nonzero()[:, 0]
        if len(dead):
            pool = torch.cat(seen)
            self.codebook.weight[dead] = pool[torch.randint(0, len(pool), (len(dead),), generator=generator)]
        return len(dead)

    def decode(self, fhat: torch.Tensor) -> torch.Tensor:
        """f-hat to images in [0, 1] (B, 1, image_size, image_size)."""
        return self.decoder(fhat).clamp(0, 1)

    def forward(self, x: torch.Tensor, quantized: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Unclamped reconstruction of images x in [0, 1] and the codebook + commitment loss (straight-through);
        ``quantized=False`` is the plain autoencoder (a warm-up before the codebook is seeded)."""
        f = self.encoder(x)
        if not quantized:  # the raw decoder output: clamping would stop the gradient of saturated pixels
            return self.decoder(f), f.new_zeros(())
        _, fhat = self.quantize(f)
        vq = F.mse_loss(fhat, f.detach()) + 0.25 * F.mse_loss(f, fhat.detach())
        return self.decoder(f + (fhat - f).detach()), vq
