"""EATA and ETA: entropy minimisation on reliable, non-redundant samples (Niu et al., ICML 2022)."""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import MmttsError
from ..core.registry import ADAPTERS
from .common import entropy_margin, softmax_entropy
from .entropy_min import EntropyAdapter

#: the reference's redundancy margin 0.05 was set for C = 1000; this is it in units of 1/sqrt(C)
REDUNDANCY_SCALE = 0.05 * math.sqrt(1000)
#: the published code's redundancy margin, the same for every C
PUBLISHED_REDUNDANCY_MARGIN = 0.05


def redundancy_margin(num_classes: int, scale: float = REDUNDANCY_SCALE) -> float:
    """Cosine margin for the redundancy filter, scaled with the number of classes.

    The cosine between a probability vector and a near-uniform moving average is
    at least 1/sqrt(C), so a fixed 0.05 (the reference's value for C = 1000,
    where 1/sqrt(C) = 0.032) would reject every sample once C < 400. Keeping the
    margin at the same multiple of 1/sqrt(C) keeps its meaning for any C.
    """
    return scale / math.sqrt(num_classes)


def _batches(data, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        chunks = list(data.split(batch_size))
        if len(chunks) > 1 and chunks[-1].shape[0] == 1:  # no chunk of one: batch statistics need two samples
            chunks[-2:] = [torch.cat(chunks[-2:])]
        yield from chunks
        return
    for item in data:
        yield item[0] if isinstance(item, (tuple, list)) else item


@ADAPTERS.register("eata")
class EATA(EntropyAdapter):
    """Entropy minimisation with sample selection, re-weighting and an anti-forgetting penalty.

    A sample is used when its entropy is below ``entropy_margin * ln C`` and its
    probability vector has cosine below :func:`redundancy_margin` to a moving
    average of past (selected) predictions; its loss is weighted by
    ``exp(E0 - E)`` with ``E0`` the entropy margin. The Fisher penalty
    ``fisher_alpha * sum F (theta - theta_0)^2`` uses a diagonal Fisher estimated on
    ``fisher_data`` (clean, unlabeled inputs) with the model's own pseudo-labels,
    as the reference does: squared gradients of the mean cross-entropy of each
    batch of ``fisher_batch_size``, averaged over batches. Defaults are the
    reference's ImageNet ones (SGD, lr 2.5e-4, momentum 0.9, alpha 2000).
    Turning the filters, the re-weighting and the penalty off gives TENT.

    Args:
        model: the classifier to adapt.
        entropy_margin: entropy filter as a fraction of ln C.
        redundancy_scale: redundancy margin in units of 1/sqrt(C) (see :func:`redundancy_margin`); default
            ``REDUNDANCY_SCALE``, or with ``published=True`` the published fixed margin 0.05 for any C.
        filter_entropy, filter_redundancy: switch the two filters on or off.
        reweight: weight each loss term by ``exp(E0 - E)``.
        ma_momentum: momentum of the moving average of selected predictions.
        fisher_alpha: weight of the Fisher penalty (0 turns it off).
        fisher_data: clean, unlabeled inputs (a tensor, or an iterable of batches) for the Fisher.
        fisher_batch_size: batch size of the Fisher estimate on a tensor.
        lr, optimizer, momentum, nesterov, weight_decay, steps, published, include, exclude, norm_kinds,
            episodic: as for :class:`~mmtts.adapters.entropy_min.EntropyAdapter`.
    """

    published_types = (nn.BatchNorm2d,)

    def __init__(self, model, *, entropy_margin: float = 0.4, redundancy_scale: float | None = None,
                 filter_entropy: bool = True, filter_redundancy: bool = True, reweight: bool = True,
                 ma_momentum: float = 0.9, fisher_alpha: float = 2000.0, fisher_data=None,
                 fisher_batch_size: int = 64, **kw):
        self.entropy_fraction = float(entropy_margin)
        self.redundancy_scale = None if redundancy_scale is None else float(redundancy_scale)
        self.filter_entropy = bool(filter_entropy)
        self.filter_redundancy = bool(filter_redundancy)
        self.reweight = bool(reweight)
        self.ma_momentum = float(ma_momentum)
        self.fisher_alpha = float(fisher_alpha)
        self._ma_probs: torch.Tensor | None = None
        super().__init__(model, **kw)
        self.fisher: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.fisher_alpha > 0:
            if fisher_data is None:
                self.release()
                raise MmttsError("eata's anti-forgetting penalty needs clean inputs to estimate the Fisher "
                                 "information: pass fisher_data=<tensor of clean samples>, or use 'eta' "
                                 "(EATA without the penalty), or fisher_alpha=0")
            try:
                with self.batch_norm_patch():
                    self.fisher = self.estimate_fisher(fisher_data, int(fisher_batch_size))
            except BaseException:
                self.release()
                raise

    def estimate_fisher(self, data, batch_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Diagonal Fisher of the adapted parameters, with pseudo-labels, and the anchor values."""
        sums = {n: torch.zeros_like(p) for n, p in self.params}
        n_batches = 0
        for x in _batches(data, batch_size):
            self.check(x)
            logits = self.logits(x)
            F.cross_entropy(logits, logits.argmax(1).detach()).backward()
            for n, p in self.params:
                if p.grad is not None:
                    sums[n] += p.grad.detach() ** 2
            self.optimizer.zero_grad(set_to_none=True)
            n_batches += 1
        if n_batches == 0:
            raise MmttsError("fisher_data held no samples; pass a non-empty tensor of clean inputs")
        return {n: (sums[n] / n_batches, p.detach().clone()) for n, p in self.params}

    def extra_state(self) -> dict:
        return {"ma_probs": self._ma_probs}

    def load_extra(self, state: dict) -> None:
        if not self.published:  # the published reset leaves the moving average as it is
            self._ma_probs = state["ma_probs"]

    def _update_ma(self, probs: torch.Tensor) -> None:
        if probs.shape[0] == 0:
            return
        mean = probs.mean(0).detach()
        self._ma_probs = mean if self._ma_probs is None else \
            self.ma_momentum * self._ma_probs + (1 - self.ma_momentum) * mean

    def redundancy_margin(self, num_classes: int) -> float:
        """The cosine margin of the redundancy filter for ``num_classes`` classes."""
        if self.redundancy_scale is None and self.published:
            return PUBLISHED_REDUNDANCY_MARGIN
        return redundancy_margin(num_classes, REDUNDANCY_SCALE if self.redundancy_scale is None
                                 else self.redundancy_scale)

    def adapt_step(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x)
        num_classes = logits.shape[1]
        e0 = entropy_margin(self.entropy_fraction, num_classes)
        ent = softmax_entropy(logits)
        keep = ent < e0 if self.filter_entropy else torch.ones_like(ent, dtype=torch.bool)
        probs = logits.softmax(1)
        if self.filter_redundancy and self._ma_probs is not None:
            cos = F.cosine_similarity(self._ma_probs.unsqueeze(0), probs.detach(), dim=1)
            keep = keep & (cos.abs() < self.redundancy_margin(num_classes))
        if self.filter_redundancy:
            self._update_ma(probs[keep])
        ent = ent[keep]
        if self.reweight:
            ent = ent * torch.exp(e0 - ent.detach())
        n_selected = int(keep.sum())
        if n_selected == 0:
            self.update(None, 0)
            return logits.detach()
        loss = ent.mean()
        if self.fisher:
            loss = loss + self.fisher_alpha * sum((self.fisher[n][0] * (p - self.fisher[n][1]) ** 2).sum()
                                                  for n, p in self.params)
        self.update(loss, n_selected)
        return logits.detach()


@ADAPTERS.register("eta")
class ETA(EATA):
    """EATA without the anti-forgetting penalty: sample selection and re-weighting only, no clean data needed.

    Args:
        model: the classifier to adapt.
        **kw: :class:`EATA`'s settings (``fisher_alpha`` defaults to 0).
    """

    def __init__(self, model, **kw):
        kw.setdefault("fisher_alpha", 0.0)
        super().__init__(model, **kw)
