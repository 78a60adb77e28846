"""Importance weights and resampling schemes for population strategies."""

from __future__ import annotations

import warnings

import numpy as np
import torch

SCHEMES = ("multinomial", "systematic")


def normalize_log_weights(log_w: torch.Tensor) -> torch.Tensor:
    """Normalised weights from log-weights; all -inf (every candidate ranked last) gives uniform weights."""
    log_w = torch.as_tensor(log_w, dtype=torch.float64)
    if torch.isnan(log_w).any():
        raise ValueError("log-weights contain NaN; scores must be validated before weighting")
    if not torch.isfinite(log_w.max()):
        if log_w.max() == float("inf"):
            raise ValueError("a log-weight is +inf; a potential must be finite or -inf")
        warnings.warn("every candidate has zero weight; resampling uniformly", RuntimeWarning, stacklevel=2)
        return torch.full_like(log_w, 1.0 / log_w.numel())
    w = torch.exp(log_w - log_w.max())
    return w / w.sum()


def effective_sample_size(log_w: torch.Tensor) -> float:
    """ESS = 1 / sum(w_i^2) of the normalised weights: n for equal weights, 1 for a single survivor."""
    w = normalize_log_weights(log_w)
    return float(1.0 / (w * w).sum())


def resample(log_w: torch.Tensor, n: int, scheme: str, rng: np.random.Generator) -> torch.Tensor:
    """Draw ``n`` ancestor indices in proportion to the weights.

    ``multinomial`` draws independently; ``systematic`` uses one uniform offset
    and n evenly spaced points, which has lower variance and keeps every
    candidate whose weight is at least 1/n.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown resampling scheme {scheme!r}; choose one of {SCHEMES}")
    w = normalize_log_weights(log_w).numpy()
    if scheme == "multinomial":
        idx = rng.choice(len(w), size=n, replace=True, p=w)
    else:
        positions = (rng.random() + np.arange(n)) / n
        cdf = np.cumsum(w)
        cdf[-1] = 1.0
        idx = np.searchsorted(cdf, positions, side="right")
    return torch.as_tensor(np.sort(idx), dtype=torch.int64)
