"""BN-adapt: normalise with the test batch's statistics instead of the source running statistics."""

from __future__ import annotations

import torch
from torch import nn

from ..core import settings
from ..core.errors import MmttsError
from ..core.registry import ADAPTERS
from .online_norm import OnlineNormAdapter

#: what the published BN-adapt code (norm.py) sets on every BatchNorm2d layer
PUBLISHED_EPS = 1e-5
PUBLISHED_MOMENTUM = 0.1


def write_running_stats(layer: nn.Module, args: tuple) -> None:
    """Fold the batch statistics of the layer's input into its running buffers, as BatchNorm's training mode does
    (momentum :data:`PUBLISHED_MOMENTUM`, unbiased variance, one more batch tracked)."""
    from ..kernels.stats import batch_norm_stats, update_running_stats

    if layer.running_mean is None or layer.running_var is None:
        return
    with torch.no_grad():
        update_running_stats(layer.running_mean, layer.running_var, batch_norm_stats(args[0]), PUBLISHED_MOMENTUM)
        if layer.num_batches_tracked is not None:
            layer.num_batches_tracked.add_(1)


@ADAPTERS.register("bn")
class BatchNormAdapt(OnlineNormAdapter):
    """Replace BatchNorm's source statistics by the current batch's (Schneider et al., Nado et al.).

    No gradient step; the running buffers are left untouched, so ``reset`` is
    trivially exact. Needs batches larger than one sample, or ``window=K`` to
    pool statistics over the last K samples.

    ``published=True`` does what the published code (TENT's ``norm.py``) does:
    only BatchNorm2d layers adapt, their ``eps`` is set to 1e-5 while the adapter
    holds the model (``release`` gives the model's own back), and every call
    writes the batch statistics into their running buffers (momentum 0.1, the
    unbiased variance, ``num_batches_tracked`` + 1); ``reset`` restores the buffers.

    Args:
        model: the classifier to adapt (its BatchNorm layers are used).
        window: 0, or the number of recent samples whose statistics each call pools.
        published: reproduce the published code's eps and running-buffer writes.
        include, exclude, norm_kinds, episodic: layer selection and per-batch reset (see
            :class:`mmtts.core.adapter.Adapter`).
    """

    def __init__(self, model, *, window: int = 0, published: bool = False, **kw):
        self.published = settings.flag("published", published, "bn")
        self._model_eps: list[tuple[nn.Module, float]] = []
        super().__init__(model, alpha=0.0, window=window, **kw)

    def configure_model(self) -> None:
        if self.published:
            self.norm_modules = [(n, m) for n, m in self.norm_modules if isinstance(m, nn.BatchNorm2d)]
            if not self.norm_modules:
                raise MmttsError(f"published bn adapts BatchNorm2d layers only, as the published code does, and "
                                 f"{type(self.model).__name__} has none selected; use published=False")
            for _, m in self.norm_modules:
                self._model_eps.append((m, m.eps))
                m.eps = PUBLISHED_EPS
        super().configure_model()

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        if not self.published:
            return super().forward_and_adapt(x)
        hooks = [m.register_forward_pre_hook(write_running_stats) for _, m in self.norm_modules]
        try:
            return super().forward_and_adapt(x)
        finally:
            for h in hooks:
                h.remove()

    def release(self) -> nn.Module:
        for m, eps in self._model_eps:
            m.eps = eps
        self._model_eps = []
        return super().release()
