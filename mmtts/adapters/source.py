"""The unadapted model: the baseline every adaptation method is measured against."""

from __future__ import annotations

import torch

from ..core.adapter import Adapter
from ..core.registry import ADAPTERS
from .common import CostCounter, check_batch, expected_ndim


@ADAPTERS.register("source")
class Source(Adapter):
    """Predict with the source model in eval mode; nothing changes.

    Unlike the other adapters it accepts models with no normalization layers.

    Args:
        model: the classifier to run.
        include, exclude, norm_kinds, episodic: layer selection and per-batch reset (see
            :class:`mmtts.core.adapter.Adapter`).
    """

    needs_norm_layers = False

    def __init__(self, model, **kw):
        super().__init__(model, **kw)
        self.cost = CostCounter()

    @torch.no_grad()
    def forward_and_adapt(self, x):
        check_batch(x, self.model, expected_ndim(self.model))
        self.cost.add(samples=x.shape[0], forward_samples=x.shape[0])
        return self.model(x)
