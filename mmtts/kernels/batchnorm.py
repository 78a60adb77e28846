"""Normalize + affine, and a fused batch-norm forward with an exact backward.

:func:`batch_norm` takes ``torch.nn.functional.batch_norm``'s arguments plus
alpha-BN's source weight: batch statistics (BN-adapt, TENT, ETA/EATA, SAR,
DeYO), source statistics (eval), or a mixture of both (alpha-BN), with
gradients through the batch statistics to the input and to the affine
parameters. :func:`batch_norm_layer` is the forward that the adapters give
their BatchNorm layers while they run, so every device normalizes with this
module: the Triton kernels on CUDA, the pure-torch reference in ``_BatchNorm``
elsewhere.
"""

from __future__ import annotations

import torch

from .stats import (BatchStats, alpha_mix, batch_norm_stats, check_channels_input, kernel_eligible,
                    update_running_stats)


def _per_channel(t, c: int, name: str, like: torch.Tensor, fill: float) -> torch.Tensor:
    if t is None:
        return torch.full((c,), fill, device=like.device, dtype=like.dtype)
    if t.shape != (c,):
        raise ValueError(f"{name} must have shape ({c},), one value per channel of x; got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but x is on {like.device}; move them to one device")
    return t


def _channel_shape(x: torch.Tensor):
    return (1, -1) + (1,) * (x.dim() - 2)


def _channel_affine(u, p, r, v=None, q=None):
    """``u*p + v*q + r`` with per-channel factors; the kernel on the Triton path, else torch."""
    if kernel_eligible(u) and (v is None or kernel_eligible(v)):
        from .norm_triton import channel_affine

        return channel_affine(u, p, r, v, q)
    shape = _channel_shape(u)
    acc = p.dtype
    out = torch.addcmul(r.reshape(shape), u.to(acc), p.reshape(shape))
    if v is not None:
        out.addcmul_(v.to(acc), q.reshape(shape))
    return out.to(u.dtype)


def _grad_sums(dy, x, mean, rstd):
    """``sum(dy)`` and ``sum(dy * xhat)`` per channel, with ``xhat = (x - mean) * rstd``."""
    dims = [0, *range(2, x.dim())]
    shape = _channel_shape(x)
    dyf = dy.to(mean.dtype)
    centred = x.to(mean.dtype) - mean.reshape(shape)
    return dyf.sum(dim=dims), (centred.mul_(dyf)).sum(dim=dims) * rstd


def normalize_affine(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel, one pass over ``x`` (no autograd)."""
    check_channels_input(x)
    c = x.shape[1]
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean = _per_channel(mean, c, "mean", x, 0.0).to(stat_dtype)
    var = _per_channel(var, c, "var", x, 1.0).to(stat_dtype)
    weight = _per_channel(weight, c, "weight", x, 1.0).to(stat_dtype)
    bias = _per_channel(bias, c, "bias", x, 0.0).to(stat_dtype)
    scale = weight * torch.rsqrt(var + eps)
    return _channel_affine(x.detach(), scale, bias - mean * scale)


class _BatchNorm(torch.autograd.Function):
    """y = (x - mean) * rstd * w + b with mean/var mixed from batch and source statistics.

    Backward (per channel, M values, g = dy*w, xhat = (x - mean)*rstd):
    d mean = -rstd*sum(g), d var = -rstd**2/2 * sum(g*xhat); these reach the
    batch statistics through the mixture, weighted by (1 - alpha) (and, for the
    exact mixture, d batch_mean gains -2*alpha*(1-alpha)*(src_mean - batch_mean)*d var);
    then dx = g*rstd + d batch_mean/M + 2*d batch_var*(x - batch_mean)/M.
    Source statistics are constants (buffers), so they get no gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, src_mean, src_var, alpha, exact, eps, use_batch, stats_sink):
        stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        batch = None
        if use_batch and kernel_eligible(x):
            from .norm_triton import batch_norm_forward

            y, batch_mean, batch_var, mean, rstd = batch_norm_forward(x, weight, bias, src_mean, src_var, alpha,
                                                                      exact, eps)
            batch = BatchStats(batch_mean, batch_var, x.numel() // x.shape[1])
        else:
            if use_batch:
                batch = batch_norm_stats(x)
                mean, var = (alpha_mix(batch.mean, batch.var, src_mean, src_var, alpha, exact) if alpha > 0
                             else (batch.mean, batch.var))
            else:
                mean, var = src_mean.to(stat_dtype), src_var.to(stat_dtype)
            rstd = torch.rsqrt(var + eps)
            scale = weight.to(stat_dtype) * rstd
            y = _channel_affine(x, scale, bias.to(stat_dtype) - mean * scale)
        if batch is not None:
            stats_sink.append(batch)
        mixes_means = batch is not None and exact and alpha > 0
        # a copy: the running buffers that served as source may be updated in place before backward
        ctx.save_for_backward(x, weight.to(stat_dtype), mean, rstd, *(() if batch is None else (batch.mean,)),
                              *((src_mean.to(stat_dtype, copy=True),) if mixes_means else ()))
        ctx.alpha, ctx.exact, ctx.use_batch = alpha, exact, use_batch
        ctx.count = None if batch is None else batch.count
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, w, mean, rstd, *rest = ctx.saved_tensors
        if kernel_eligible(dy, x):
            from .norm_triton import batch_norm_backward

            exact_mix = ctx.use_batch and ctx.exact and ctx.alpha > 0
            dx, dw, db = batch_norm_backward(dy, x, w, mean, rstd, rest[0] if ctx.use_batch else None,
                                             rest[1] if exact_mix else None, ctx.alpha, ctx.use_batch)
            needs = ctx.needs_input_grad
            return (dx if needs[0] else None, dw if needs[1] else None, db if needs[2] else None,
                    None, None, None, None, None, None, None)
        sum_dy, sum_dy_xhat = _grad_sums(dy, x, mean, rstd)
        dw = sum_dy_xhat if ctx.needs_input_grad[1] else None
        db = sum_dy if ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            d_mean = -rstd * w * sum_dy
            d_var = -0.5 * rstd * rstd * w * sum_dy_xhat
            if ctx.use_batch:
                batch_mean = rest[0]
                a, m = ctx.alpha, ctx.count
                d_bmean = (1 - a) * d_mean
                if ctx.exact and a > 0:
                    d_bmean = d_bmean - 2 * a * (1 - a) * (rest[1] - batch_mean) * d_var
                k = 2 * (1 - a) * d_var / m
                dx = _channel_affine(dy, w * rstd, d_bmean / m - k * batch_mean, x, k)
            else:
                dx = _channel_affine(dy, w * rstd, torch.zeros_like(rstd))
        return dx, dw, db, None, None, None, None, None, None, None


def batch_norm(x: torch.Tensor, running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = True,
               momentum: float = 0.1, eps: float = 1e-5, *, source_weight: float = 0.0, exact_mixture: bool = False,
               update_running: bool | None = None) -> torch.Tensor:
    """Batch normalization of ``x`` (N, C, *spatial), differentiable in ``x``, ``weight`` and ``bias``.

    Same arguments and results as ``torch.nn.functional.batch_norm``, plus:

    - ``source_weight`` (alpha-BN): in training mode, normalize with
      ``alpha_mix(batch, running, source_weight, exact_mixture)``, the running
      buffers acting as the source statistics; 0 is plain batch norm.
    - ``update_running``: whether training mode writes the batch statistics
      into the running buffers (momentum, unbiased variance). Defaults to
      True for plain batch norm and False when mixing, since alpha-BN keeps
      its source statistics fixed.

    In eval mode (``training=False``) the running statistics normalize.
    """
    check_channels_input(x)
    c = x.shape[1]
    if not 0.0 <= source_weight <= 1.0:
        raise ValueError(f"source_weight={source_weight} must lie in [0, 1]")
    if not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum={momentum!r} must be a number in [0, 1]; for BatchNorm's cumulative average "
                         "(momentum=None) pass 1 / number of batches seen")
    needs_source = not training or source_weight > 0
    if needs_source and (running_mean is None or running_var is None):
        raise ValueError("eval mode and source_weight > 0 normalize with the running statistics; "
                         "pass running_mean and running_var")
    if running_mean is not None:
        _per_channel(running_mean, c, "running_mean", x, 0.0)
        _per_channel(running_var, c, "running_var", x, 1.0)
    if training and x.numel() // c < 2:
        raise ValueError(f"expected more than 1 value per channel when training, got input of shape {tuple(x.shape)}; "
                         "batch more inputs or use training=False")
    weight = _per_channel(weight, c, "weight", x, 1.0)
    bias = _per_channel(bias, c, "bias", x, 0.0)
    batch_stats: list[BatchStats] = []
    y = _BatchNorm.apply(x, weight, bias, running_mean, running_var, float(source_weight), bool(exact_mixture),
                         float(eps), bool(training), batch_stats)
    if update_running is None:
        update_running = training and source_weight == 0
    if update_running:
        if not training:
            raise ValueError("update_running=True needs training=True: eval mode has no batch statistics")
        if running_mean is not None:
            update_running_stats(running_mean, running_var, batch_stats[0], momentum)
    return y


def batch_norm_layer(layer: torch.nn.Module, x: torch.Tensor, *, source_weight: float = 0.0,
                     exact_mixture: bool = False) -> torch.Tensor:
    """A BatchNorm layer's forward through :func:`batch_norm`, reading (never writing) its running buffers.

    Args:
        layer: a ``torch.nn.BatchNorm1d/2d/3d`` (its ``weight``, ``bias``, ``eps`` and running buffers are used).
        x: the layer's input, (N, C, *spatial).
        source_weight: weight of the layer's running statistics against the batch's (alpha-BN); 0 normalizes
            with the batch statistics alone, 1 is the layer in eval mode.
        exact_mixture: mix the variances as a two-component mixture (see :func:`mmtts.kernels.alpha_mix`).
    """
    if source_weight >= 1.0:
        return batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, training=False,
                          eps=layer.eps)
    return batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, training=True,
                      eps=layer.eps, source_weight=source_weight, exact_mixture=exact_mixture, update_running=False)
