"""Classifier verifiers: log-probability of a target class under any torch classifier (timm included)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..core.errors import MmttsError
from ..core.registry import VERIFIERS
from ..core.verifier import Verifier


@VERIFIERS.register("classifier")
class ClassifierLogProb(Verifier):
    """Score = log p(target | image) under ``model``.

    ``features`` optionally returns the penultimate features, for diversity measures.

    Args:
        model: the image classifier.
        target: the class of every candidate; without it the class comes from the
            process context (``context["label"]``, one per candidate), as a
            class-conditional process provides.
        transform: maps the batch of outputs (B, C, H, W) in [0, 1] to the model's input
            (resize, normalise); defaults to resizing to ``input_size`` when given.
        input_size: (H, W) the outputs are resized to when no ``transform`` is given.
        batch_size: images per classifier forward.
        name: the verifier's name.
        nonfinite: what a NaN or infinite score does (``"last"`` ranks it last, ``"error"`` raises).
    """

    def __init__(self, model: torch.nn.Module, target: int | None = None, transform: Callable | None = None,
                 input_size: tuple[int, int] | None = None, batch_size: int = 256, name: str = "classifier",
                 nonfinite: str = "last"):
        super().__init__(nonfinite)
        self.model = model.eval()
        self.target = target
        self.transform = transform
        self.input_size = input_size
        self.batch_size = batch_size
        self.name = name

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise MmttsError(f"{self.name} scores image batches (B, C, H, W); got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        if self.input_size is not None and tuple(images.shape[-2:]) != tuple(self.input_size):
            images = F.interpolate(images, size=self.input_size, mode="bilinear", align_corners=False)
        return self.transform(images) if self.transform is not None else images

    @torch.no_grad()
    def log_probs(self, images: torch.Tensor) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        outs = [self.model(self.prepare(chunk).to(dev)).float().log_softmax(1).cpu()
                for chunk in images.split(self.batch_size)]
        return torch.cat(outs)

    def targets(self, n: int, context) -> torch.Tensor:
        if self.target is not None:
            return torch.full((n,), int(self.target), dtype=torch.int64)
        if isinstance(context, dict) and "label" in context:
            return torch.as_tensor(context["label"], dtype=torch.int64).reshape(-1).expand(n)
        raise MmttsError(f"{self.name} needs a target class: pass target= or use a class-conditional process")

    def score(self, outputs, context=None):
        lp = self.log_probs(outputs)
        return lp.gather(1, self.targets(len(outputs), context)[:, None])[:, 0]
