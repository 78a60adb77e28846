"""alpha-BN: BatchNorm statistics mixed between the source and the test batch."""

from __future__ import annotations

from ..core.registry import ADAPTERS
from .online_norm import OnlineNormAdapter


@ADAPTERS.register("alpha-bn")
class AlphaBatchNorm(OnlineNormAdapter):
    """Normalize with ``alpha * source + (1 - alpha) * batch`` moments (You et al. 2021).

    ``alpha`` is the weight on the *source* statistics: ``alpha=1`` is the
    source model, ``alpha=0`` is BN-adapt. The reference implementation names
    the weight on the batch instead (its default 0.1 on the batch is our 0.9).
    ``exact_variance=True`` uses the variance of the mixture distribution, which
    adds ``alpha (1 - alpha) (mu_source - mu_batch)^2`` to the linear mix; the
    reference mixes variances linearly, which understates the spread when the
    means differ. Works at batch size 1 when ``alpha > 0``, since the source
    statistics regularize the single-sample ones; ``window=K`` pools recent
    samples as well.

    Args:
        model: the classifier to adapt (its BatchNorm layers, with running statistics, are used).
        alpha: weight of the source statistics, in [0, 1].
        exact_variance: add the mixture term ``alpha (1 - alpha) (mu_source - mu_batch)^2`` to the variance.
        window: 0, or the number of recent samples whose statistics each call pools.
        include, exclude, norm_kinds, episodic: layer selection and per-batch reset (see
            :class:`mmtts.core.adapter.Adapter`).
    """

    def __init__(self, model, *, alpha: float = 0.9, exact_variance: bool = False, window: int = 0, **kw):
        super().__init__(model, alpha=alpha, exact_variance=exact_variance, window=window, **kw)
