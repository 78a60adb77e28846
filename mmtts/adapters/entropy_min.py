"""Shared machinery of the gradient methods that minimise prediction entropy (TENT, EATA, DeYO, SAR).

They adapt the affine parameters of the selected normalization layers; BatchNorm
layers normalize with the test batch's statistics through
:mod:`mmtts.kernels` while the adapter runs (and leave their running buffers
alone), GroupNorm and LayerNorm layers are per-sample anyway. The
prediction returned for a batch is the one made *before* that batch's update
(with ``steps > 1``, the first step's), as in the reference implementations.

``published=True`` (TENT, EATA/ETA, DeYO) reproduces the published code where
mmtts departs from it by default: the whole model in training mode (dropout and
drop-connect active), only the normalization types and layer names the
published code adapts, and with ``steps > 1`` the prediction of the last step.
:func:`published_optimizer` gives the published optimizer settings for a batch size.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..core import settings
from ..core.adapter import BATCHNORM, Adapter
from ..core.errors import MmttsError
from .common import CostCounter, check_batch, expected_ndim

OPTIMIZERS = ("sgd", "adam")
BACKBONES = ("resnet", "vit")


def published_optimizer(method: str, batch_size: int, backbone: str = "resnet", optimizer: str | None = None) -> dict:
    """The optimizer settings the published code of ``method`` uses at ``batch_size``, for :func:`mmtts.adapt`.

    - ``tent`` (the TENT code's configs): Adam, lr 1e-3, whatever the batch;
      ``optimizer="sgd"`` gives its SGD option, momentum 0.9 with Nesterov, lr 1e-3.
    - ``eata`` / ``eta`` (the EATA code): SGD, lr 2.5e-4, momentum 0.9, whatever the batch (it runs batch 64).
    - ``deyo`` (the DeYO code's run script): SGD, momentum 0.9; ResNets lr 2.5e-4 from batch 32 up and
      ``2 * 2.5e-4 * batch / 64`` below; ViTs ``1e-3 * batch / 64``; at batch 1 the lr doubles again.

    Use: ``mmtts.adapt(model, "deyo", published=True, **published_optimizer("deyo", 16))``.

    Args:
        method: ``"tent"``, ``"eata"``, ``"eta"`` or ``"deyo"``.
        batch_size: the test batch size the adapter will see.
        backbone: ``"resnet"`` or ``"vit"`` (only DeYO's learning rate depends on it).
        optimizer: for ``tent`` only, ``"adam"`` (its configs) or ``"sgd"`` (its SGD option).
    """
    batch = settings.whole("batch_size", batch_size, "published_optimizer")
    settings.choice("backbone", backbone, BACKBONES, "published_optimizer")
    method = settings.choice("method", method, ("tent", "eata", "eta", "deyo"), "published_optimizer")
    if optimizer is not None and method != "tent":
        raise MmttsError(f"published_optimizer: the published {method} code uses SGD only; drop optimizer=")
    if method == "tent":
        if settings.choice("optimizer", optimizer or "adam", OPTIMIZERS, "published_optimizer") == "adam":
            return {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0}
        return {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0}
    if method in ("eata", "eta"):
        return {"optimizer": "sgd", "lr": 2.5e-4, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0}
    if backbone == "vit":
        lr = 1e-3 / 64 * batch
    else:
        lr = 2.5e-4 / 64 * batch * 2 if batch < 32 else 2.5e-4
    if batch == 1:
        lr *= 2
    return {"optimizer": "sgd", "lr": lr, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0}


class EntropyAdapter(Adapter):
    """Base class: optimizer settings, input checks, batch-size rules and cost counters.

    Args:
        model: the classifier to adapt.
        lr: learning rate (default: the method's reference value).
        optimizer: ``"sgd"`` or ``"adam"`` (default: the method's reference choice).
        momentum: SGD momentum.
        nesterov: Nesterov momentum (SGD with momentum > 0 only).
        weight_decay: weight decay of the optimizer.
        steps: updates per batch.
        published: reproduce the published code's layer modes, adapted layers and returned prediction (see the
            module docstring); the default keeps every layer but the normalization in evaluation mode.
        include, exclude, norm_kinds, episodic: layer selection and per-batch reset (see
            :class:`mmtts.core.adapter.Adapter`).
    """

    #: optimizer defaults of the method's reference code
    default_optimizer: ClassVar[str] = "sgd"
    default_lr: ClassVar[float] = 2.5e-4
    #: normalization types whose affine parameters the published code adapts (None: no published preset)
    published_types: ClassVar[tuple[type[nn.Module], ...] | None] = None
    #: the published code skips the layers whose module name contains one of these (or equals ``norm``)
    published_skips: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model, *, lr: float | None = None, optimizer: str | None = None, momentum: float = 0.9,
                 nesterov: bool = False, weight_decay: float = 0.0, steps: int = 1, published: bool = False, **kw):
        self.lr = float(self.default_lr if lr is None else lr)
        self.optimizer_name = (optimizer or self.default_optimizer).lower()
        if self.optimizer_name not in OPTIMIZERS:
            raise MmttsError(f"optimizer={optimizer!r}; choose one of {OPTIMIZERS}")
        if self.lr < 0:
            raise MmttsError(f"lr={lr} must be >= 0")
        if int(steps) < 1:
            raise MmttsError(f"steps={steps} must be a positive number of updates per batch")
        self.momentum = float(momentum)
        self.nesterov = settings.flag("nesterov", nesterov, self.name)
        if self.nesterov and (self.optimizer_name != "sgd" or self.momentum <= 0):
            raise MmttsError(f"nesterov=True needs optimizer='sgd' with momentum > 0; got optimizer="
                             f"{self.optimizer_name!r}, momentum={self.momentum}")
        self.published = settings.flag("published", published, self.name)
        if self.published and self.published_types is None:
            raise MmttsError(f"{self.name} has no published preset; drop published=True")
        self.weight_decay = float(weight_decay)
        self.steps = int(steps)
        self.cost = CostCounter()
        super().__init__(model, **kw)
        self._ndim = expected_ndim(model)
        self._has_batchnorm = any(isinstance(m, BATCHNORM) for _, m in self.norm_modules)
        if not self.params:
            self.release()
            if self.published:
                kinds = "/".join(t.__name__ for t in self.published_types)
                skips = f" outside {', '.join(self.published_skips)}" if self.published_skips else ""
                raise MmttsError(f"published {self.name} adapts {kinds} layers{skips} only, as the published code "
                                 f"does, and {type(model).__name__} has none with affine parameters; use "
                                 "published=False (which adapts BatchNorm, GroupNorm and LayerNorm layers)")
            names = ", ".join(n for n, _ in self.norm_modules[:3])
            raise MmttsError(f"{self.name} found norm layers ({names}, ...) but none has affine parameters to adapt "
                             "(affine=False / elementwise_affine=False); use 'bn' or 'alpha-bn' instead")

    def configure_model(self) -> None:
        super().configure_model()
        self.use_batch_statistics()
        if self.published:  # the published configure_model: train() on everything, dropout included
            self.model.train()
            selected = {id(m) for _, m in self.norm_modules}
            for m in self.model.modules():  # BatchNorm left out by include/exclude keeps its source statistics
                if isinstance(m, BATCHNORM) and id(m) not in selected:
                    m.eval()

    def published_adapts(self, name: str, module: nn.Module) -> bool:
        """Whether the published code adapts the normalization layer ``module`` called ``name``."""
        skipped = name == "norm" or any(s in name for s in self.published_skips)
        return isinstance(module, self.published_types) and not skipped

    def collect_params(self):
        params = self.norm_affine_params()
        if not self.published:
            return params
        adapts = {name: self.published_adapts(name, m) for name, m in self.norm_modules}
        kept = []
        for pname, p in params:
            if adapts[pname.rpartition(".")[0]]:
                kept.append((pname, p))
            else:
                p.requires_grad_(False)
        return kept

    def build_optimizer(self, params):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999), weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                               nesterov=self.nesterov)

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
        for _ in range(self.steps):  # the published code returns the last step's prediction, mmtts the first's
            out = self.adapt_step(x)
            logits = out if logits is None or self.published else logits
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
