"""BN-adapt: normalise with the test batch's statistics instead of the source running statistics."""

from __future__ import annotations

from ..core.registry import ADAPTERS
from .online_norm import OnlineNormAdapter


@ADAPTERS.register("bn")
class BatchNormAdapt(OnlineNormAdapter):
    """Replace BatchNorm's source statistics by the current batch's (Schneider et al., Nado et al.).

    No gradient step; the running buffers are left untouched, so ``reset`` is
    trivially exact. Needs batches larger than one sample, or ``window=K`` to
    pool statistics over the last K samples.

    Args:
        model: the classifier to adapt (its BatchNorm layers are used).
        window: 0, or the number of recent samples whose statistics each call pools.
        include, exclude, norm_kinds, episodic: layer selection and per-batch reset (see
            :class:`mmtts.core.adapter.Adapter`).
    """

    def __init__(self, model, *, window: int = 0, **kw):
        super().__init__(model, alpha=0.0, window=window, **kw)
