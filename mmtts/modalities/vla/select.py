"""Choosing one candidate from its verifier scores.

``argmax`` trusts the verifier; softmax sampling with a temperature hedges
against an over-confident verifier (and becomes argmax as the temperature
goes to zero, uniform as it grows).
"""

from __future__ import annotations

import torch

from ...core.errors import MmttsError


class Selector:
    """``Selector("argmax")`` or ``Selector("softmax", temperature=t)``; call with scores (M,) and a generator."""

    MODES = ("argmax", "softmax")

    def __init__(self, mode: str = "argmax", temperature: float = 1.0):
        if mode not in self.MODES:
            raise MmttsError(f"selector mode {mode!r}; choose one of {self.MODES}")
        if not temperature > 0:
            raise MmttsError(f"selector temperature={temperature} must be positive; use mode='argmax' for greedy")
        self.mode, self.temperature = mode, float(temperature)

    def __call__(self, scores: torch.Tensor, generator: torch.Generator) -> int:
        scores = scores.detach().to(torch.float64).cpu()
        if scores.ndim != 1 or scores.numel() == 0:
            raise MmttsError(f"selector needs a non-empty vector of scores, got shape {tuple(scores.shape)}")
        if not torch.isfinite(scores).any():
            raise MmttsError("every candidate scored -inf or NaN; nothing to select")
        if self.mode == "argmax":
            return int(torch.argmax(torch.nan_to_num(scores, nan=float("-inf"))))
        logits = torch.nan_to_num(scores, nan=float("-inf")) / self.temperature
        probs = torch.softmax(logits - logits.max(), 0)
        return int(torch.multinomial(probs, 1, generator=generator))

    def __repr__(self) -> str:
        return f"Selector({self.mode!r}, temperature={self.temperature})" if self.mode == "softmax" else "Selector('argmax')"
