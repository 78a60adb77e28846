"""Online normalization math: test-batch moments, mixing with source moments, normalizing.

This is the single pure-torch place where gradient-free adapters (``bn``,
``alpha_bn``) compute normalization. ``online_batch_norm`` is the seam: a fused
kernel may replace it as long as it returns the same tensor for the same
arguments. Everything here works for any input of shape (N, C, *spatial) and
reduces over every dimension except the channel dimension 1, like BatchNorm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _reduce_dims(x: torch.Tensor) -> tuple[int, ...]:
    return (0, *range(2, x.ndim))


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x`` (what BatchNorm normalizes with in training mode).

    Computed from the mean and the mean square, which reduce in one sweep each;
    ``torch.var_mean`` over (N, H, W) is several times slower on the CPU. In
    float32 the difference of the two is accurate to about 1e-6 of the variance
    unless the mean is far larger than the spread, which normalization-layer
    inputs are not.
    """
    dims = _reduce_dims(x)
    mean = x.mean(dims)
    var = (x * x).mean(dims) - mean * mean
    return mean, var.clamp_min(0.0)


def mix_moments(source_mean: torch.Tensor, source_var: torch.Tensor, batch_mean: torch.Tensor,
                batch_var: torch.Tensor, alpha: float, exact_variance: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments of the mixture ``alpha * source + (1 - alpha) * batch``; ``alpha`` weighs the source.

    With ``exact_variance`` the variance is that of the two-component mixture,
    which adds ``alpha (1 - alpha) (mu_source - mu_batch)^2`` to the linear mix of
    variances; without it the variances are mixed linearly (the published recipe).
    """
    mean = alpha * source_mean + (1.0 - alpha) * batch_mean
    var = alpha * source_var + (1.0 - alpha) * batch_var
    if exact_variance:
        var = var + alpha * (1.0 - alpha) * (source_mean - batch_mean) ** 2
    return mean, var


def normalize(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
              bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with per-channel statistics and affine.

    This is exactly batch normalization with given statistics, so it runs as
    evaluation-mode ``batch_norm``: one fused sweep over ``x``.
    """
    return F.batch_norm(x, mean, var, weight, bias, training=False, momentum=0.0, eps=eps)


def online_batch_norm(x: torch.Tensor, source_mean: torch.Tensor | None, source_var: torch.Tensor | None,
                      weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, alpha: float = 0.0,
                      exact_variance: bool = False) -> torch.Tensor:
    """Normalize ``x`` with its own moments mixed with the source moments (``alpha`` on the source).

    ``alpha = 0`` is BatchNorm in training mode (without touching running
    buffers); ``alpha = 1`` is BatchNorm in evaluation mode.
    """
    if alpha >= 1.0:
        return normalize(x, source_mean, source_var, weight, bias, eps)
    mean, var = batch_moments(x)
    if alpha > 0.0:
        mean, var = mix_moments(source_mean, source_var, mean, var, alpha, exact_variance)
    return normalize(x, mean, var, weight, bias, eps)
