"""A class-conditional next-scale-prediction transformer (VAR) with an explicit KV cache.

The sequence is every scale's token map, coarse to fine. The first position is
a start token made from the class embedding; the inputs of scale k > 0 are
f-hat of scales < k downsampled to scale k's size. Attention is block-causal:
a token sees every token of its own and earlier scales, so a whole scale is
predicted in one forward. At sampling time each scale's keys and values are
written into a cache of the full sequence length, so a scale costs a forward
over its own tokens only. The last class id is the null class (unconditional).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CachedAttention(nn.Module):
    """Multi-head self-attention that reads and writes a preallocated KV cache.

    Args:
        width: model width.
        heads: attention heads (width must divide evenly).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def split(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention over the whole sequence with a boolean ``mask`` (True: may attend); for training."""
        q, k, v = self.split(h)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).flatten(2))

    def cached(self, h: torch.Tensor, kv: torch.Tensor, start: int) -> torch.Tensor:
        """Attention of the tokens at positions [start, start + n) over the cache up to them.

        ``kv`` (B, 2, heads, L, head_dim) receives their keys and values in place.
        """
        q, k, v = self.split(h)
        end = start + h.shape[1]
        kv[:, 0, :, start:end] = k
        kv[:, 1, :, start:end] = v
        y = F.scaled_dot_product_attention(q, kv[:, 0, :, :end], kv[:, 1, :, :end])
        return self.out(y.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Pre-norm transformer block: cached attention and a GELU MLP.

    Args:
        width: model width.
        heads: attention heads.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CachedAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.norm1(h), mask)
        return h + self.mlp(self.norm2(h))

    def cached(self, h: torch.Tensor, kv: torch.Tensor, start: int) -> torch.Tensor:
        h = h + self.attn.cached(self.norm1(h), kv, start)
        return h + self.mlp(self.norm2(h))


class NextScaleTransformer(nn.Module):
    """Predicts every token of scale k from the class and the scales before it.

    Args:
        scales: side of each scale's token map, coarse to fine.
        vocab: codebook size (logits per token).
        code_dim: channels of f-hat (the input of scales > 0).
        num_classes: real classes; id ``num_classes`` is the null class.
        width: model width.
        depth: transformer blocks.
        heads: attention heads.
    """

    def __init__(self, scales=(1, 2, 3, 4, 6, 8), vocab: int = 64, code_dim: int = 16, num_classes: int = 10,
                 width: int = 128, depth: int = 3, heads: int = 4):
        super().__init__()
        self.scales = tuple(int(s) for s in scales)
        self.bounds = [0]
        for s in self.scales:
            self.bounds.append(self.bounds[-1] + s * s)
        self.length = self.bounds[-1]
        self.num_classes, self.depth, self.heads, self.width = num_classes, depth, heads, width
        self.class_emb = nn.Embedding(num_classes + 1, width)
        self.word = nn.Linear(code_dim, width)
        self.pos = nn.Parameter(torch.randn(1, self.length, width) * 0.02)
        self.level = nn.Embedding(len(self.scales), width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        levels = torch.cat([torch.full((s * s,), k) for k, s in enumerate(self.scales)])
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("mask", levels[None, :] <= levels[:, None], persistent=False)

    def cache_shape(self, batch: int) -> tuple[int, ...]:
        """Shape of an empty KV cache for ``batch`` sequences."""
        return (batch, self.depth, 2, self.heads, self.length, self.width // self.heads)

    def embed(self, k: int, inputs: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """Input tokens of scale k: the start token (k = 0) or f-hat features (B, n_k, code_dim)."""
        c = self.class_emb(labels)[:, None]
        lo, hi = self.bounds[k], self.bounds[k + 1]
        h = c if k == 0 else self.word(inputs) + c
        return h + self.pos[:, lo:hi] + self.level.weight[k]

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits of every position (B, L, vocab) from teacher-forcing inputs (B, L - 1, code_dim); for training."""
        c = self.class_emb(labels)[:, None]
        h = torch.cat([c, self.word(inputs) + c], 1) + self.pos + self.level(self.levels)[None]
        for block in self.blocks:
            h = block(h, self.mask)
        return self.head(self.norm(h))

    def forward_scale(self, k: int, inputs: torch.Tensor | None, labels: torch.Tensor,
                      kv: torch.Tensor) -> torch.Tensor:
        """Logits of scale k's tokens (B, n_k, vocab); writes their keys and values into ``kv`` (see
        :meth:`cache_shape`), which must hold scales < k already."""
        h = self.embed(k, inputs, labels)
        for i, block in enumerate(self.blocks):
            h = block.cached(h, kv[:, i], self.bounds[k])
        return self.head(self.norm(h))
