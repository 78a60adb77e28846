"""Choosing one candidate from its verifier scores.

``argmax`` trusts the verifier; softmax sampling with a temperature hedges
against an over-confident verifier (and becomes argmax as the temperature
goes to zero, uniform as it grows).
"""

from __future__ import annotations

import torch

from ...core.errors import MmttsError

NOTHING_TO_SELECT = "every candidate scored -inf or NaN; nothing to select"


class Selector:
    """``Selector("argmax")`` or ``Selector("softmax", temperature=t)``.

    Call it with the scores of one observation's candidates (M,) and a
    generator for an index; :meth:`select` chooses for B observations at once
    from a padded (B, K) score matrix.

    Args:
        mode: ``"argmax"`` (greedy) or ``"softmax"`` (sample in proportion to exp(score / temperature)).
        temperature: positive softmax temperature.
    """

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
        return int(self.select(torch.nan_to_num(scores, nan=float("-inf"))[None], generator)[0])

    def select(self, scores: torch.Tensor, generator: torch.Generator, checked: bool = False) -> torch.Tensor:
        """One index per row of ``scores`` (B, K), where -inf marks a slot that is not a candidate.

        Every row needs a finite score (``checked=True`` says the caller has
        made sure of it); NaN must already be -inf. Returns (B,) int64.
        """
        if self.mode == "argmax":
            best, index = scores.max(1)
            if not checked and float(best.min() if best.shape[0] > 1 else best) == float("-inf"):
                raise MmttsError(NOTHING_TO_SELECT)
            return index
        if not checked and not bool(torch.isfinite(scores).any(1).all()):
            raise MmttsError(NOTHING_TO_SELECT)
        logits = scores / self.temperature
        probs = torch.softmax(logits - logits.max(1, keepdim=True).values, 1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    def __repr__(self) -> str:
        return f"Selector({self.mode!r}, temperature={self.temperature})" if self.mode == "softmax" else "Selector('argmax')"
