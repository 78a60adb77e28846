"""Per-channel batch statistics, their mixing with source statistics, and streaming merges.

The conventions are PyTorch's: statistics are over every dimension but the
channel (dim 1), the variance used to normalize is the biased one, and the
variance written to running buffers is the unbiased one. Accumulation is in
float32 (float64 for float64 inputs) whatever the input dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .dispatch import use_triton

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BatchStats(NamedTuple):
    """Per-channel mean and biased variance of shape (C,), over ``count`` values per channel."""

    mean: torch.Tensor
    var: torch.Tensor
    count: int

    @property
    def unbiased_var(self) -> torch.Tensor:
        if self.count < 2:
            raise ValueError("the unbiased variance needs at least 2 values per channel")
        return self.var * (self.count / (self.count - 1))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_channels_input(x: torch.Tensor, name: str = "x") -> None:
    if not torch.is_tensor(x) or x.dim() < 2:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of shape (N, C, *spatial) with channels in dim 1; got {shape}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} has dtype {x.dtype}; normalization takes floating-point tensors")
    if x.numel() == 0:
        raise ValueError(f"{name} of shape {tuple(x.shape)} is empty; statistics need at least one value")


def kernel_eligible(*tensors: torch.Tensor) -> bool:
    """Triton handles float32/16/bf16; float64 (gradcheck) always takes the reference."""
    return all(t.dtype in KERNEL_DTYPES for t in tensors) and use_triton(*tensors)


def batch_norm_stats_reference(x: torch.Tensor) -> BatchStats:
    """Per-channel mean and biased variance in pure torch: what every non-kernel call runs, and the kernel's yardstick.

    Two passes, the mean and then the mean squared deviation from it, so a mean
    far larger than the spread costs no precision (unlike ``E[x^2] - E[x]^2``);
    on the CPU this is several times faster than ``torch.var_mean`` over the
    same dimensions.
    """
    dims = [0, *range(2, x.dim())]
    xf = x.detach().to(acc_dtype(x.dtype))
    mean = xf.mean(dim=dims, keepdim=True)
    var = (xf - mean).square_().mean(dim=dims)
    return BatchStats(mean.reshape(-1), var, x.numel() // x.shape[1])


def batch_norm_stats(x: torch.Tensor) -> BatchStats:
    """Mean and biased variance per channel of ``x`` (N, C, *spatial), in one pass over ``x`` on the kernel path.

    Not differentiable on either path (gradients through the statistics go
    through :func:`mmtts.kernels.batch_norm`), so CPU and GPU behave alike.
    """
    check_channels_input(x)
    if kernel_eligible(x):
        from .norm_triton import channel_stats

        mean, var = channel_stats(x)
        return BatchStats(mean, var, x.numel() // x.shape[1])
    return batch_norm_stats_reference(x)


def alpha_mix(batch_mean, batch_var, source_mean, source_var, alpha, exact: bool = False):
    """Mix source and batch statistics; ``alpha`` is the weight of the *source*.

    ``mean = alpha*source_mean + (1-alpha)*batch_mean``; the variance mixes
    likewise and, with ``exact``, adds ``alpha*(1-alpha)*(source_mean -
    batch_mean)**2`` so it is the variance of the two-component mixture
    (without it, the alpha-BN paper's plain interpolation). alpha = 0 is
    BN-adapt, alpha = 1 the source model. Differentiable in the batch side.
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1]: it is the weight of the source statistics")
    for name, t in (("batch_var", batch_var), ("source_mean", source_mean), ("source_var", source_var)):
        if t.shape != batch_mean.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but batch_mean has {tuple(batch_mean.shape)}")
    dtype = batch_mean.dtype
    sm, sv = source_mean.to(dtype), source_var.to(dtype)
    mean = alpha * sm + (1 - alpha) * batch_mean
    var = alpha * sv + (1 - alpha) * batch_var
    if exact:
        var = var + alpha * (1 - alpha) * (sm - batch_mean) ** 2
    return mean, var


def merge_stats(a: BatchStats, b: BatchStats, forget: float = 1.0) -> BatchStats:
    """Chan et al.'s pairwise merge, with ``a``'s weight first discounted by ``forget`` in (0, 1].

    ``forget = 1`` gives exactly the statistics of the concatenated data.
    The merged ``count`` is a weight and may be fractional.
    """
    if not 0.0 < forget <= 1.0:
        raise ValueError(f"forget={forget} must lie in (0, 1]; 1 keeps all history")
    wa, wb = a.count * forget, b.count
    w = wa + wb
    delta = b.mean - a.mean
    mean = a.mean + delta * (wb / w)
    var = (wa * a.var + wb * b.var) / w + delta**2 * (wa * wb / w**2)
    return BatchStats(mean, var, w)


class StreamingStats:
    """Per-channel statistics merged across a stream of batches with a forgetting factor.

    Each new batch enters with its own count; the history's weight is
    multiplied by ``forget`` first, so old batches fade geometrically (an
    exponential moving average that, unlike a momentum update, weighs batches
    by their size and keeps the between-batch spread of the means).

    Args:
        forget: factor in (0, 1] applied to the history's weight before each batch; 1 keeps all history.
    """

    def __init__(self, forget: float = 1.0):
        if not 0.0 < forget <= 1.0:
            raise ValueError(f"forget={forget} must lie in (0, 1]; 1 keeps all history")
        self.forget = forget
        self.stats: BatchStats | None = None

    def update(self, x: torch.Tensor) -> BatchStats:
        """Fold in the batch ``x`` (N, C, *spatial) and return the merged statistics."""
        return self.update_stats(batch_norm_stats(x))

    def update_stats(self, batch: BatchStats) -> BatchStats:
        self.stats = batch if self.stats is None else merge_stats(self.stats, batch, self.forget)
        return self.stats

    def reset(self) -> None:
        self.stats = None


@torch.no_grad()
def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor, batch: BatchStats,
                         momentum: float) -> None:
    """PyTorch's in-place running-buffer update: the *unbiased* batch variance enters the running variance."""
    running_mean.lerp_(batch.mean.to(running_mean.dtype), momentum)
    running_var.lerp_(batch.unbiased_var.to(running_var.dtype), momentum)
