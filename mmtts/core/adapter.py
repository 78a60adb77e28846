"""Adapter: update a model from unlabeled test data while it predicts.

A method is one class: ``configure_model`` (modes and which tensors may
change), ``collect_params`` (what the optimizer updates), and
``forward_and_adapt`` (predict, then update). The base class selects
normalization layers by type and name, snapshots *only* what the method can
change (the adapted parameters, the buffers of the selected layers, the
optimizer state and any method state) and restores it bit for bit on
``reset()``. ``release()`` hands the model back with its original modes and
``requires_grad`` flags.

BatchNorm layers that a method normalizes with test-batch statistics get
:func:`mmtts.kernels.batch_norm_layer` as their forward only while the adapter
runs (inside ``adapter(x)``, or the ``batch_norm_patch()`` context): the patch
is undone when the call returns or raises, so the caller's model is never left
patched, and every device normalizes through :mod:`mmtts.kernels`.
"""

from __future__ import annotations

import copy
import fnmatch
from abc import abstractmethod
from contextlib import contextmanager
from functools import partial
from typing import ClassVar, Iterator, Sequence

import torch
from torch import nn

from .errors import MmttsError

BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
NORM_KINDS: dict[str, tuple[type[nn.Module], ...]] = {
    "batchnorm": BATCHNORM,
    "layernorm": (nn.LayerNorm,),
    "groupnorm": (nn.GroupNorm,),
}


def is_frozen_batchnorm(m: nn.Module) -> bool:
    """torchvision's FrozenBatchNorm2d (and look-alikes): statistics and affine as fixed buffers."""
    return type(m).__name__ == "FrozenBatchNorm2d"


def unfreeze_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every FrozenBatchNorm2d with an equivalent nn.BatchNorm2d, in place; returns the model."""
    for name, child in list(model.named_children()):
        if is_frozen_batchnorm(child):
            bn = nn.BatchNorm2d(child.weight.numel(), eps=getattr(child, "eps", 1e-5))
            with torch.no_grad():
                bn.weight.copy_(child.weight)
                bn.bias.copy_(child.bias)
                bn.running_mean.copy_(child.running_mean)
                bn.running_var.copy_(child.running_var)
            bn.to(child.weight.device)
            bn.eval()
            setattr(model, name, bn)
        else:
            unfreeze_batchnorm(child)
    return model


def select_norm_modules(model: nn.Module, kinds: Sequence[str], include: Sequence[str] | None = None,
                        exclude: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """Normalization modules of the given kinds whose names match ``include`` and not ``exclude`` (globs)."""
    unknown = [k for k in kinds if k not in NORM_KINDS]
    if unknown:
        raise MmttsError(f"unknown norm kind(s) {unknown}; choose from {sorted(NORM_KINDS)}")
    types = tuple(t for k in kinds for t in NORM_KINDS[k])
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, types):
            continue
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        out.append((name, m))
    return out


class Adapter(nn.Module):
    """Base class of test-time adaptation methods. ``adapter(x)`` predicts and adapts.

    Args:
        model: the network to adapt (a torch ``nn.Module`` with initialised parameters).
        include: glob patterns of module names; only matching normalization layers adapt.
        exclude: glob patterns of module names whose normalization layers are left alone.
        norm_kinds: normalization kinds to adapt (keys of ``NORM_KINDS``); defaults to the
            method's ``norm_kinds``.
        episodic: reset the model to its initial state before every batch.
    """

    name: ClassVar[str] = ""
    #: norm kinds the method adapts by default (see NORM_KINDS)
    norm_kinds: ClassVar[tuple[str, ...]] = ("batchnorm", "layernorm", "groupnorm")
    #: False for methods that also run models with no normalization layers
    needs_norm_layers: ClassVar[bool] = True

    def __init__(self, model: nn.Module, *, include: Sequence[str] | None = None,
                 exclude: Sequence[str] | None = None, norm_kinds: Sequence[str] | None = None,
                 episodic: bool = False):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"an adapter wraps a torch nn.Module, not {type(model).__name__}")
        self.model = model
        self.episodic = bool(episodic)
        lazy = [n for n, p in model.named_parameters() if isinstance(p, torch.nn.parameter.UninitializedParameter)]
        if lazy:
            raise MmttsError(f"{type(model).__name__} has uninitialized lazy parameters (e.g. {lazy[0]!r}); run one "
                             "forward pass on a batch of its inputs before adapting it")
        kinds = tuple(norm_kinds) if norm_kinds is not None else self.norm_kinds
        frozen = [n for n, m in model.named_modules() if is_frozen_batchnorm(m)]
        self.norm_modules = select_norm_modules(model, kinds, include, exclude)
        if not self.norm_modules and self.needs_norm_layers:
            hint = ""
            if frozen:
                hint = (f" The model has {len(frozen)} FrozenBatchNorm2d layer(s) (e.g. {frozen[0]!r}): they hold "
                        "fixed statistics and no trainable affine, so nothing can adapt; convert them with "
                        "mmtts.core.adapter.unfreeze_batchnorm(model) first.")
            raise MmttsError(
                f"{type(self).__name__} found nothing to adapt: no {'/'.join(kinds)} layers"
                f"{' matching include=' + str(list(include)) if include else ''}"
                f"{' after exclude=' + str(list(exclude)) if exclude else ''} in {type(model).__name__}.{hint}"
                " Use the 'source' adapter to run the model unchanged."
            )
        self._original_flags = {
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "training": {n: m.training for n, m in model.named_modules()},
        }
        self._batch_norm_mix: tuple[float, bool] | None = None
        try:
            self.configure_model()
            self.params = self.collect_params()
            self.optimizer = self.build_optimizer([p for _, p in self.params]) if self.params else None
            self._snapshot = self.snapshot()
        except BaseException:
            self.release()
            raise

    # -- what a method defines -----------------------------------------------------
    def configure_model(self) -> None:
        """Set modes and requires_grad. Default: eval mode, nothing trainable."""
        self.model.eval()
        self.model.requires_grad_(False)

    def collect_params(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters the optimizer updates (default: none, a gradient-free method)."""
        return []

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer | None:
        return None

    def extra_state(self) -> dict:
        """Method state beyond parameters and buffers (moving averages, windows); copied on snapshot."""
        return {}

    def load_extra(self, state: dict) -> None:
        """Restore what :meth:`extra_state` returned."""

    @abstractmethod
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        """Return predictions for ``x`` and update the model from it."""

    # -- helpers for methods -----------------------------------------------------------
    def norm_affine_params(self) -> list[tuple[str, nn.Parameter]]:
        """Affine weight and bias of the selected norm layers, enabled for gradients."""
        out = []
        for mname, m in self.norm_modules:
            for pname, p in m.named_parameters(recurse=False):
                if pname in ("weight", "bias"):
                    p.requires_grad_(True)
                    out.append((f"{mname}.{pname}" if mname else pname, p))
        return out

    def use_batch_statistics(self, source_weight: float = 0.0, exact_mixture: bool = False) -> None:
        """Selected BatchNorm layers normalise with the test batch's statistics while the adapter runs.

        ``source_weight`` mixes in the layers' running statistics (alpha-BN;
        see :func:`mmtts.kernels.batch_norm_layer`). Buffers are read, never
        written, and the layers' modes do not change.
        """
        self._batch_norm_mix = (float(source_weight), bool(exact_mixture))

    @contextmanager
    def batch_norm_patch(self) -> Iterator[None]:
        """While inside, the BatchNorm layers chosen by :meth:`use_batch_statistics` run through the kernels.

        Each layer's previous forward comes back on exit, whether the body
        returned or raised; nothing happens for a method that never called
        :meth:`use_batch_statistics`. ``adapter(x)`` runs inside it.
        """
        if self._batch_norm_mix is None:
            yield
            return
        from ..kernels.batchnorm import batch_norm_layer

        source_weight, exact = self._batch_norm_mix
        saved = []
        try:
            for _, m in self.norm_modules:
                if isinstance(m, BATCHNORM):
                    saved.append((m, m.__dict__.get("forward")))
                    m.forward = partial(batch_norm_layer, m, source_weight=source_weight, exact_mixture=exact)
            yield
        finally:
            for m, previous in reversed(saved):
                if previous is None:
                    del m.forward
                else:
                    m.forward = previous

    # -- snapshot / reset ------------------------------------------------------------
    def _norm_buffers(self) -> dict[str, torch.Tensor]:
        out = {}
        for mname, m in self.norm_modules:
            for bname, b in m.named_buffers(recurse=False):
                if b is not None:
                    out[f"{mname}.{bname}"] = b
        return out

    def snapshot(self) -> dict:
        return {
            "params": {n: p.detach().clone() for n, p in self.params},
            "buffers": {n: b.detach().clone() for n, b in self._norm_buffers().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else None,
            "extra": copy.deepcopy(self.extra_state()),
        }

    @torch.no_grad()
    def reset(self) -> None:
        """Return to the source model exactly: parameters, norm buffers, optimizer and method state."""
        snap = self._snapshot
        for n, p in self.params:
            p.copy_(snap["params"][n])
        for n, b in self._norm_buffers().items():
            b.copy_(snap["buffers"][n])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
        self.load_extra(copy.deepcopy(snap["extra"]))

    def release(self) -> nn.Module:
        """Give the (adapted) model back with its original modes and requires_grad flags."""
        flags = self._original_flags
        for n, p in self.model.named_parameters():
            p.requires_grad_(flags["requires_grad"].get(n, p.requires_grad))
        for n, m in self.model.named_modules():
            m.train(flags["training"].get(n, m.training))
        return self.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict on the batch ``x`` and adapt on it. A floating batch in another precision than the model's
        (float64 from numpy, half) is converted to the model's dtype, and a channels-last batch to contiguous
        memory: both conversions are unambiguous."""
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), x.dtype)
            x = x.to(dtype).contiguous()
        if self.episodic:
            self.reset()
        with self.batch_norm_patch():
            return self.forward_and_adapt(x)

    def adapted_names(self) -> list[str]:
        """Qualified names of what the method changes (parameters and buffers)."""
        return [n for n, _ in self.params] + list(self._norm_buffers())
