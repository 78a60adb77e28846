"""Gradient-free adapters that re-normalize BatchNorm layers with test-batch statistics.

While the adapter runs, the selected BatchNorm layers normalize through
:func:`mmtts.kernels.batch_norm_layer` with ``alpha * source + (1 - alpha) *
batch`` moments (the Triton kernels on CUDA, their pure-torch reference
elsewhere; see :meth:`mmtts.core.adapter.Adapter.use_batch_statistics`).
Running buffers are read, never written, so ``reset`` is exact. A ``window``
of past inputs lets these methods run at batch size 1: each call normalizes
with the statistics of the current sample(s) and the most recent ones, up to
``window`` samples.
"""

from __future__ import annotations

import torch

from ..core.adapter import Adapter
from ..core.errors import MmttsError
from .common import CostCounter, check_batch, expected_ndim


class OnlineNormAdapter(Adapter):
    """Base of ``bn`` and ``alpha-bn``: BatchNorm with ``alpha * source + (1 - alpha) * batch`` moments.

    Args:
        model: the classifier to adapt.
        alpha: weight of the source (running) statistics, in [0, 1].
        exact_variance: mix the variances as a two-component mixture.
        window: 0, or the number of recent samples whose statistics each call pools.
        include, exclude, norm_kinds, episodic: layer selection and per-batch reset (see
            :class:`mmtts.core.adapter.Adapter`).
    """

    norm_kinds = ("batchnorm",)

    def __init__(self, model, *, alpha: float = 0.0, exact_variance: bool = False, window: int = 0, **kw):
        if not 0.0 <= float(alpha) <= 1.0:
            raise MmttsError(f"alpha={alpha} must lie in [0, 1]: it is the weight on the source statistics")
        if int(window) < 0:
            raise MmttsError(f"window={window} must be 0 (off) or a number of recent samples to pool statistics over")
        self.alpha = float(alpha)
        self.exact_variance = bool(exact_variance)
        self.window = int(window)
        self._recent: torch.Tensor | None = None
        self.cost = CostCounter()
        super().__init__(model, **kw)
        self._ndim = expected_ndim(model)

    def configure_model(self) -> None:
        super().configure_model()
        for name, m in self.norm_modules:
            if self.alpha > 0 and (m.running_mean is None or m.running_var is None):
                raise MmttsError(f"BatchNorm layer {name!r} keeps no running statistics (track_running_stats=False), "
                                 "so there are no source statistics to mix; use the 'bn' adapter or a model trained "
                                 "with running statistics")
        self.use_batch_statistics(self.alpha, self.exact_variance)

    def extra_state(self) -> dict:
        return {"recent": self._recent}

    def load_extra(self, state: dict) -> None:
        self._recent = state["recent"]

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, self.model, self._ndim)
        n = x.shape[0]
        if n < 2 and self.alpha == 0.0 and not self.window:
            raise MmttsError(
                f"{self.name} estimates statistics from the test batch and got a batch of {n}; pass window=K to "
                "pool the last K samples, use 'alpha-bn' (mixes in the source statistics), or batch inputs together")
        self.cost.add(samples=n, forward_samples=n)
        if not self.window:
            return self.model(x)
        keep = max(self.window - n, 0)
        full = x if self._recent is None or keep == 0 else torch.cat([self._recent[-keep:], x])
        self._recent = full[-self.window:].detach().clone()
        self.cost.add(forward_samples=full.shape[0] - n)
        return self.model(full)[-n:]
