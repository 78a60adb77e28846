"""BN-adapt: normalise with the test batch's statistics instead of the source running statistics."""

from __future__ import annotations

import torch

from ..core.adapter import Adapter
from ..core.registry import ADAPTERS


@ADAPTERS.register("bn")
class BatchNormAdapt(Adapter):
    """Replace BatchNorm's source statistics by the current batch's (Schneider et al., Nado et al.).

    No gradient step; the running buffers are left untouched, so ``reset`` is
    trivially exact. Needs batches larger than one sample.
    """

    norm_kinds = ("batchnorm",)

    def configure_model(self):
        super().configure_model()
        self.use_batch_statistics()

    @torch.no_grad()
    def forward_and_adapt(self, x):
        if x.shape[0] < 2:
            raise ValueError(
                "bn adaptation needs a batch of at least 2 samples to estimate statistics; "
                f"got a batch of {x.shape[0]}: batch inputs together or use the 'source' adapter"
            )
        return self.model(x)
