"""Shared machinery of the gradient methods that minimise prediction entropy (TENT, EATA, DeYO, SAR).

They adapt the affine parameters of the selected normalization layers; BatchNorm
layers normalize with the test batch's statistics through
:mod:`mmtts.kernels` while the adapter runs (and leave their running buffers
alone), GroupNorm and LayerNorm layers are per-sample anyway. The
prediction returned for a batch is the one made *before* that batch's update,
as in the reference implementations.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..core.adapter import BATCHNORM, Adapter
from ..core.errors import MmttsError
from .common import CostCounter, check_batch, expected_ndim

OPTIMIZERS = ("sgd", "adam")


class EntropyAdapter(Adapter):
    """Base class: optimizer settings, input checks, batch-size rules and cost counters.

    Args:
        model: the classifier to adapt.
        lr: learning rate (default: the method's reference value).
        optimizer: ``"sgd"`` or ``"adam"`` (default: the method's reference choice).
        momentum: SGD momentum.
        weight_decay: weight decay of the optimizer.
        steps: updates per batch.
        include, exclude, norm_kinds, episodic: layer selection and per-batch reset (see
            :class:`mmtts.core.adapter.Adapter`).
    """

    #: optimizer defaults of the method's reference code
    default_optimizer: ClassVar[str] = "sgd"
    default_lr: ClassVar[float] = 2.5e-4

    def __init__(self, model, *, lr: float | None = None, optimizer: str | None = None, momentum: float = 0.9,
                 weight_decay: float = 0.0, steps: int = 1, **kw):
        self.lr = float(self.default_lr if lr is None else lr)
        self.optimizer_name = (optimizer or self.default_optimizer).lower()
        if self.optimizer_name not in OPTIMIZERS:
            raise MmttsError(f"optimizer={optimizer!r}; choose one of {OPTIMIZERS}")
        if self.lr < 0:
            raise MmttsError(f"lr={lr} must be >= 0")
        if int(steps) < 1:
            raise MmttsError(f"steps={steps} must be a positive number of updates per batch")
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.steps = int(steps)
        self.cost = CostCounter()
        super().__init__(model, **kw)
        self._ndim = expected_ndim(model)
        self._has_batchnorm = any(isinstance(m, BATCHNORM) for _, m in self.norm_modules)
        if not self.params:
            self.release()
            names = ", ".join(n for n, _ in self.norm_modules[:3])
            raise MmttsError(f"{self.name} found norm layers ({names}, ...) but none has affine parameters to adapt "
                             "(affine=False / elementwise_affine=False); use 'bn' or 'alpha-bn' instead")

    def configure_model(self) -> None:
        super().configure_model()
        self.use_batch_statistics()

    def collect_params(self):
        return self.norm_affine_params()

    def build_optimizer(self, params):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999), weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def check(self, x: torch.Tensor) -> None:
        check_batch(x, self.model, self._ndim)
        if x.shape[0] < 2 and self._has_batchnorm:
            raise MmttsError(
                f"{self.name} normalizes BatchNorm layers with the test batch, which a batch of 1 cannot estimate "
                "(and one sample's gradient is too noisy to adapt on). Use a model with GroupNorm or LayerNorm "
                "(they adapt at batch size 1), the 'alpha-bn' adapter, or batch inputs together.")

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        self.cost.add(samples=x.shape[0], forward_samples=x.shape[0] * self.steps)
        logits = None
        for _ in range(self.steps):
            out = self.adapt_step(x)
            logits = out if logits is None else logits
        return logits

    def adapt_step(self, x: torch.Tensor) -> torch.Tensor:
        """One forward and (possibly) one update; returns the detached logits of the forward."""
        raise NotImplementedError

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's forward on ``x``, refused unless it is class logits of shape (B, C): the entropy of a
        feature map or of a single score is not a prediction's uncertainty."""
        out = self.model(x)
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0] or out.shape[1] < 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise MmttsError(
                f"{self.name} minimizes the entropy of class predictions and needs logits of shape "
                f"({x.shape[0]}, C) with C >= 2; {type(self.model).__name__} returned {shape}. Give it a model "
                "that ends in a classifier head (e.g. pooling and a linear layer), or use 'bn' / 'alpha-bn', "
                "which need no logits.")
        return out

    def update(self, loss: torch.Tensor | None, n_backward: int) -> None:
        """Back-propagate ``loss`` over ``n_backward`` samples and step; no step when nothing was selected."""
        if n_backward > 0:
            loss.backward()
            self.optimizer.step()
            self.cost.add(backward_samples=n_backward)
        self.optimizer.zero_grad(set_to_none=True)
