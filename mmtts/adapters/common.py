"""What every adaptation method shares: input checks, entropy, class-count-derived margins, cost counters."""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch import nn

from ..core.errors import MmttsError

_CONV_NDIM = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}
_SHAPES = {3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}


def expected_ndim(model: nn.Module) -> int | None:
    """Input rank implied by the model's first convolution (None when it has none, e.g. an MLP)."""
    for m in model.modules():
        for kind, ndim in _CONV_NDIM.items():
            if isinstance(m, kind):
                return ndim
    return None


def check_batch(x, model: nn.Module, ndim: int | None) -> None:
    """Reject input the model cannot adapt on, before anything runs, so a bad batch changes nothing."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"adapters take a torch.Tensor batch, not {type(x).__name__}; convert with torch.as_tensor")
    if not x.is_floating_point():
        raise MmttsError(f"input has dtype {x.dtype}; pass a floating-point batch (e.g. x.float() / 255)")
    if ndim is not None and x.ndim != ndim:
        hint = " For a single sample, add the batch dimension: x.unsqueeze(0)." if x.ndim == ndim - 1 else ""
        raise MmttsError(f"{type(model).__name__} expects a batch of shape {_SHAPES[ndim]} ({ndim} dims); "
                         f"got shape {tuple(x.shape)}.{hint}")
    if ndim is None and x.ndim < 2:
        raise MmttsError(f"expected a batch with a leading batch dimension, got shape {tuple(x.shape)}; "
                         "for a single sample use x.unsqueeze(0)")
    if x.shape[0] == 0:
        raise MmttsError("empty batch (0 samples); skip the call instead")
    stem = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
    if stem is not None and x.ndim == stem.weight.ndim and x.shape[1] != stem.in_channels:
        hint = " (channels last? use x.permute(0, 3, 1, 2))" if x.shape[-1] == stem.in_channels else ""
        raise MmttsError(f"{type(model).__name__}'s first convolution takes {stem.in_channels} channel(s); the batch "
                         f"of shape {tuple(x.shape)} has {x.shape[1]} on dimension 1{hint}")
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise MmttsError(f"input has NaN or infinite values in {bad} of {x.shape[0]} sample(s); nothing was run "
                         "and the model is unchanged. Drop or repair those samples (e.g. torch.nan_to_num).")


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits), one value per row."""
    logp = logits.log_softmax(1)
    return -(logp.exp() * logp).sum(1)


def entropy_margin(fraction: float, num_classes: int) -> float:
    """An entropy threshold as a fraction of the maximum entropy ln C, so it means the same for any C."""
    return fraction * math.log(num_classes)


class CostCounter:
    """Samples seen, extra forward samples and samples back-propagated, for a per-sample cost.

    Counts live in ``counts`` (a ``collections.Counter``); the constructor takes no arguments.
    """

    def __init__(self):
        self.counts = Counter()

    def add(self, **kw: int) -> None:
        self.counts.update({k: int(v) for k, v in kw.items()})

    def per_sample(self, key: str) -> float:
        return self.counts[key] / max(self.counts["samples"], 1)
