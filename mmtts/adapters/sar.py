"""SAR: sharpness-aware, reliable entropy minimisation with model recovery (Niu et al., ICLR 2023)."""

from __future__ import annotations

import math

import torch

from ..core.errors import MmttsError
from ..core.registry import ADAPTERS
from .common import entropy_margin, softmax_entropy
from .entropy_min import EntropyAdapter

#: the reference resets when the moving average of the loss drops below 0.2 nats, a value set for C = 1000
RESET_FRACTION = 0.2 / math.log(1000)


@ADAPTERS.register("sar")
class SAR(EntropyAdapter):
    """Entropy minimisation on low-entropy samples with a sharpness-aware (SAM) step.

    Samples with entropy below ``entropy_margin * ln C`` are used; the weights are
    first moved ``rho`` along the normalized gradient, the loss is recomputed
    there (keeping samples still below the margin) and its gradient updates the
    original weights. When the moving average (momentum 0.9) of that second loss
    falls below ``reset_margin * ln C`` the model has collapsed onto confident
    predictions and is reset to the source. The reference's reset threshold is
    0.2 nats for C = 1000; here it is the same fraction of ln C for any C.
    Defaults are the reference's (SGD, lr 2.5e-4, momentum 0.9, rho 0.05). The
    reference adapts all but the last block's norm layers; pass ``exclude``
    globs to do the same on a given architecture. When no sample stays below
    the margin after the sharpness step, the reference back-propagates the
    mean of an empty tensor (NaN) into the weights; here the update is skipped.

    Args:
        model: the classifier to adapt.
        entropy_margin: entropy filter as a fraction of ln C.
        rho: radius of the sharpness-aware step.
        reset_margin: recover the source model when the loss average falls below this fraction of ln C.
        ema_momentum: momentum of that loss average.
        lr, optimizer, momentum, weight_decay, steps, include, exclude, norm_kinds, episodic: as for
            :class:`~mmtts.adapters.entropy_min.EntropyAdapter`.
    """

    def __init__(self, model, *, entropy_margin: float = 0.4, rho: float = 0.05,
                 reset_margin: float = RESET_FRACTION, ema_momentum: float = 0.9, **kw):
        if float(rho) < 0:
            raise MmttsError(f"rho={rho} must be >= 0 (the radius of the sharpness-aware step)")
        self.entropy_fraction = float(entropy_margin)
        self.rho = float(rho)
        self.reset_fraction = float(reset_margin)
        self.ema_momentum = float(ema_momentum)
        self._ema: float | None = None
        self.recoveries = 0
        super().__init__(model, **kw)

    def extra_state(self) -> dict:
        return {"ema": self._ema}

    def load_extra(self, state: dict) -> None:
        self._ema = state["ema"]

    def _ascend(self) -> list[torch.Tensor]:
        """Move every parameter by rho * g / ||g|| (g over all adapted parameters); returns the moves."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in self.params]
        norm = torch.norm(torch.stack([g.norm(2) for g in grads]), 2)
        moves = [g * (self.rho / (norm + 1e-12)) for g in grads]
        with torch.no_grad():
            for (_, p), e in zip(self.params, moves):
                p.add_(e)
        self.optimizer.zero_grad(set_to_none=True)
        return moves

    def adapt_step(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x)
        num_classes = logits.shape[1]
        margin = entropy_margin(self.entropy_fraction, num_classes)
        ent = softmax_entropy(logits)
        idx = (ent < margin).nonzero().squeeze(1)
        if idx.numel() == 0:
            self.update(None, 0)
            return logits.detach()
        ent[idx].mean().backward()
        moves = self._ascend()
        ent2 = softmax_entropy(self.model(x))[idx]
        keep = ent2 < margin
        self.cost.add(forward_samples=x.shape[0], backward_samples=idx.numel())
        if keep.any():
            loss = ent2[keep].mean()
            value = float(loss.detach())
            self._ema = value if self._ema is None else self.ema_momentum * self._ema + (1 - self.ema_momentum) * value
            loss.backward()
        with torch.no_grad():
            for (_, p), e in zip(self.params, moves):
                p.sub_(e)
        if keep.any():
            self.optimizer.step()
            self.cost.add(backward_samples=int(keep.sum()))
        self.optimizer.zero_grad(set_to_none=True)
        if self._ema is not None and self._ema < entropy_margin(self.reset_fraction, num_classes):
            self.reset()
            self.recoveries += 1
        return logits.detach()
