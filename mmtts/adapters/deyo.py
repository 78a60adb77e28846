"""DeYO: entropy minimisation on samples whose prediction depends on shape (Lee et al., ICLR 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import MmttsError
from ..core.registry import ADAPTERS
from .common import entropy_margin, softmax_entropy
from .entropy_min import EntropyAdapter


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of (N, C, H, W) images: what torchvision's ``Resize`` does to a float tensor."""
    if tuple(size) == tuple(x.shape[-2:]):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def patch_shuffle(x: torch.Tensor, grid: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cut each image into a ``grid x grid`` array of patches and permute them (one permutation per image).

    An image whose side is not a multiple of ``grid`` is resized to the nearest
    multiple below it first and back afterwards with :func:`resize` (antialiased,
    as the reference does). The permutations draw from ``generator``, or from
    torch's global generator when it is None (as the reference does).
    """
    n, c, h, w = x.shape
    ph, pw = max(h // grid, 1), max(w // grid, 1)
    y = resize(x, (ph * grid, pw * grid))
    patches = y.reshape(n, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, c, ph, pw)
    perm = torch.argsort(torch.rand(n, grid * grid, generator=generator), dim=1).to(x.device)
    patches = patches[torch.arange(n, device=x.device).unsqueeze(1), perm]
    y = patches.reshape(n, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, ph * grid, pw * grid)
    return resize(y, (h, w))


@ADAPTERS.register("deyo")
class DeYO(EntropyAdapter):
    """Entropy minimisation filtered and weighted by the pseudo-label probability difference (PLPD).

    PLPD = p(y|x) - p(y|x') for the predicted class y and a patch-shuffled view
    x' (which destroys shape but keeps local texture). A sample is used when its
    entropy is below ``entropy_margin * ln C`` and its PLPD above
    ``plpd_threshold``; its loss is weighted by ``exp(E0 - E) + exp(PLPD)`` with
    ``E0 = reweight_margin * ln C``. Defaults are the reference's ImageNet ones
    (SGD, lr 2.5e-4, momentum 0.9, margins 0.5 and 0.4 of ln C, threshold 0.2).
    Turning both filters and both weights off gives TENT (and skips the extra
    forward pass on x'). The shuffle draws from a generator seeded by ``seed``
    and restored by ``reset``, so a rerun repeats exactly.

    ``published=True`` does what the published code does instead: it runs the
    whole model in training mode, adapts only BatchNorm2d, LayerNorm and
    GroupNorm layers whose names contain none of ``layer4``, ``blocks.9``,
    ``blocks.10``, ``blocks.11``, ``norm.`` (nor are ``norm``), and draws the
    shuffle from torch's global generator (seed it with ``torch.manual_seed``;
    ``seed`` is unused), which ``reset`` leaves alone.

    Args:
        model: the classifier to adapt.
        entropy_margin: entropy filter as a fraction of ln C.
        plpd_threshold: keep samples whose PLPD exceeds it.
        reweight_margin: ``E0`` of the entropy weight, as a fraction of ln C.
        filter_entropy, filter_plpd: switch the two filters on or off.
        reweight_entropy, reweight_plpd: switch the two weight terms on or off.
        patch_grid: the shuffle cuts each image into ``patch_grid x patch_grid`` patches.
        seed: seed of the shuffle's generator.
        lr, optimizer, momentum, nesterov, weight_decay, steps, published, include, exclude, norm_kinds,
            episodic: as for :class:`~mmtts.adapters.entropy_min.EntropyAdapter`.
    """

    published_types = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
    published_skips = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm.")

    def __init__(self, model, *, entropy_margin: float = 0.5, plpd_threshold: float = 0.2,
                 reweight_margin: float = 0.4, filter_entropy: bool = True, filter_plpd: bool = True,
                 reweight_entropy: bool = True, reweight_plpd: bool = True, patch_grid: int = 4, seed: int = 0,
                 **kw):
        if int(patch_grid) < 2:
            raise MmttsError(f"patch_grid={patch_grid}: the shuffle needs at least a 2x2 grid of patches")
        self.entropy_fraction = float(entropy_margin)
        self.plpd_threshold = float(plpd_threshold)
        self.reweight_fraction = float(reweight_margin)
        self.filter_entropy = bool(filter_entropy)
        self.filter_plpd = bool(filter_plpd)
        self.reweight_entropy = bool(reweight_entropy)
        self.reweight_plpd = bool(reweight_plpd)
        self.patch_grid = int(patch_grid)
        self.generator = torch.Generator().manual_seed(int(seed))
        super().__init__(model, **kw)
        if (self.filter_plpd or self.reweight_plpd or self.published) and self._ndim not in (None, 4):
            self.release()
            raise MmttsError("deyo's patch shuffle works on images (N, C, H, W); for other inputs turn off "
                             "filter_plpd and reweight_plpd")

    def extra_state(self) -> dict:
        return {} if self.published else {"generator": self.generator.get_state()}

    def load_extra(self, state: dict) -> None:
        if not self.published:
            self.generator.set_state(state["generator"])

    def adapt_step(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x)
        num_classes = logits.shape[1]
        ent = softmax_entropy(logits)
        keep = ent < entropy_margin(self.entropy_fraction, num_classes) if self.filter_entropy \
            else torch.ones_like(ent, dtype=torch.bool)
        idx = keep.nonzero().squeeze(1)
        plpd = None
        if (self.filter_plpd or self.reweight_plpd or self.published) and idx.numel():  # published: always drawn
            with torch.no_grad():
                shuffled = self.model(patch_shuffle(x[idx].detach(), self.patch_grid,
                                                      None if self.published else self.generator))
            self.cost.add(forward_samples=idx.numel())
            probs = logits[idx].detach().softmax(1)
            cls = probs.argmax(1, keepdim=True)
            plpd = (probs.gather(1, cls) - shuffled.softmax(1).gather(1, cls)).squeeze(1)
            if self.filter_plpd:
                sel = plpd > self.plpd_threshold
                idx, plpd = idx[sel], plpd[sel]
        if idx.numel() == 0:
            self.update(None, 0)
            return logits.detach()
        ent = ent[idx]
        if self.reweight_entropy or self.reweight_plpd:
            coeff = torch.zeros_like(ent)
            if self.reweight_entropy:
                coeff = coeff + torch.exp(entropy_margin(self.reweight_fraction, num_classes) - ent.detach())
            if self.reweight_plpd:
                coeff = coeff + torch.exp(plpd)
            ent = ent * coeff
        self.update(ent.mean(), idx.numel())
        return logits.detach()
