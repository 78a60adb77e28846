"""TENT: minimise the entropy of the predictions on each test batch (Wang et al., ICLR 2021)."""

from __future__ import annotations

import torch
from torch import nn

from ..core.registry import ADAPTERS
from .common import softmax_entropy
from .entropy_min import EntropyAdapter


@ADAPTERS.register("tent")
class Tent(EntropyAdapter):
    """Entropy minimisation on the affine parameters of the normalization layers.

    Defaults follow the reference: one Adam step (lr 1e-3) per batch, BatchNorm
    with test-batch statistics. The reference adapts BatchNorm2d only; here
    GroupNorm and LayerNorm layers are adapted too (select with ``norm_kinds``),
    so models built on them adapt at batch size 1. ``published=True`` adapts
    BatchNorm2d only and runs the whole model in training mode, as the published code.

    Args:
        model: the classifier to adapt.
        lr, optimizer, momentum, nesterov, weight_decay, steps, published: the optimizer and the published
            preset (see :class:`~mmtts.adapters.entropy_min.EntropyAdapter`).
        include, exclude, norm_kinds, episodic: layer selection and per-batch reset (see
            :class:`mmtts.core.adapter.Adapter`).
    """

    default_optimizer = "adam"
    default_lr = 1e-3
    published_types = (nn.BatchNorm2d,)

    def adapt_step(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x)
        self.update(softmax_entropy(logits).mean(), x.shape[0])
        return logits.detach()
