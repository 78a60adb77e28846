"""Policies that can sample, and the LeRobot-shaped observation batches they read.

The wrapper needs one thing from a policy: N actions (or action chunks) per
observation, drawn from the generator it passes, so that a run is a pure
function of its seed. ``sample_actions(batch, num_samples, generator)``
returns (B, N, D) or (B, N, H, D). Two adapters cover the common kinds: a
Gaussian head (a temperature scales its standard deviation) and a policy
that takes its noise as an argument, as flow-matching policies do
(``noise=``). The token adapter for discretised-action VLMs is in
``tokens.py``.

A batch is a dict as LeRobot passes it: ``"observation.state"`` (B, S),
images under ``"observation.images.*"``, and the instruction under ``"task"``
(a list of B strings).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from ...core.errors import MmttsError

STATE_KEY = "observation.state"


@runtime_checkable
class SamplingPolicy(Protocol):
    def sample_actions(self, batch: Mapping[str, Any], num_samples: int, generator: torch.Generator) -> torch.Tensor:
        """``num_samples`` actions per observation: (B, N, D) or (B, N, H, D)."""


def all_finite(x: torch.Tensor) -> bool:
    """Whether every element of a floating tensor is finite, in one reduction: a NaN or inf makes the sum
    non-finite; only when the sum is not finite (or overflows) are the elements checked one by one."""
    return math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all())


def expand_rows(batch: Mapping[str, Any], n: int) -> dict:
    """:func:`repeat_rows` for reading only: a single observation becomes ``n`` views of itself, no copy."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.expand(n, *v.shape[1:]) if v.shape[0] == 1 else v.repeat_interleave(n, 0)
        elif isinstance(v, (list, tuple)):
            out[k] = [x for x in v for _ in range(n)]
        else:
            out[k] = v
    return out


def batch_rows(batch: Mapping[str, Any]) -> int:
    """The number of observations B in a LeRobot-shaped batch, checking every entry agrees."""
    if not isinstance(batch, Mapping):
        raise MmttsError(f"an observation batch is a dict such as {{'{STATE_KEY}': tensor (B, S)}}, "
                         f"not {type(batch).__name__}")
    sizes = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            if v.ndim == 0:
                raise MmttsError(f"batch[{k!r}] is a 0-d tensor; put the observations on dimension 0")
            sizes[k] = int(v.shape[0])
        elif isinstance(v, (list, tuple)):
            sizes[k] = len(v)
    if not sizes:
        raise MmttsError("the observation batch holds no tensors or lists; nothing to act on")
    if len(set(sizes.values())) != 1:
        raise MmttsError(f"batch entries disagree on the number of observations: {sizes}")
    return next(iter(sizes.values()))


def check_shapes(batch: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> int:
    """Validate ``batch`` against per-observation ``shapes`` (without the batch dimension); returns B."""
    b = batch_rows(batch)
    for key, shape in shapes.items():
        if key not in batch:
            raise MmttsError(f"the observation batch has no {key!r} (it has {sorted(batch)}); "
                             f"this policy reads {key!r} of shape (B, {', '.join(map(str, shape))})")
        v = batch[key]
        if not isinstance(v, torch.Tensor) or tuple(v.shape[1:]) != tuple(shape):
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            hint = " (a single observation needs a leading batch dimension: x.unsqueeze(0))" \
                if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(shape) else ""
            raise MmttsError(f"observation {key!r} has shape {got}; this policy expects "
                             f"(B, {', '.join(map(str, shape))}){hint}")
        if v.is_floating_point() and not all_finite(v):
            raise MmttsError(f"observation {key!r} contains NaN or inf; check the sensor or the environment")
    return b


def repeat_rows(batch: Mapping[str, Any], n: int) -> dict:
    """Each observation repeated ``n`` times in place (row b becomes rows b*n .. b*n+n-1)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.repeat_interleave(n, 0)
        elif isinstance(v, (list, tuple)):
            out[k] = [x for x in v for _ in range(n)]
        else:
            out[k] = v
    return out


def take_rows(batch: Mapping[str, Any], index: torch.Tensor) -> dict:
    """The observations at ``index`` (duplicates allowed)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v[index.to(v.device)]
        elif isinstance(v, (list, tuple)):
            out[k] = [v[i] for i in index.tolist()]
        else:
            out[k] = v
    return out


def slice_rows(batch: Mapping[str, Any], start: int, stop: int) -> dict:
    """The observations ``start`` to ``stop`` (views where possible)."""
    return {k: v[start:stop] if isinstance(v, (torch.Tensor, list, tuple)) else v for k, v in batch.items()}


class GaussianPolicy(nn.Module):
    """A policy whose head outputs a diagonal Gaussian: ``module(state) -> (mean, log_std)``.

    One forward gives the distribution, so N samples cost one forward
    whatever N is. ``temperature`` scales the standard deviation
    (1: the trained distribution; 0: the mean).
    """

    def __init__(self, module: nn.Module, state_dim: int, temperature: float = 1.0, state_key: str = STATE_KEY):
        super().__init__()
        if temperature < 0:
            raise MmttsError(f"temperature={temperature} must be >= 0")
        self.module, self.temperature, self.state_key = module, float(temperature), state_key
        self.input_shapes = {state_key: (int(state_dim),)}

    @torch.no_grad()
    def sample_actions(self, batch, num_samples, generator):
        mean, log_std = self.module(batch[self.state_key])
        std = log_std.exp() * self.temperature
        eps = torch.randn((mean.shape[0], num_samples, *mean.shape[1:]), generator=generator,
                          dtype=mean.dtype).to(mean.device)
        return mean[:, None] + std[:, None] * eps

    @torch.no_grad()
    def select_action(self, batch) -> torch.Tensor:
        """The mean action (LeRobot's deterministic ``select_action``)."""
        check_shapes(batch, self.input_shapes)
        return self.module(batch[self.state_key])[0]


class NoisePolicy:
    """A policy that takes its sampling noise as an argument (flow matching: ``fn(batch, noise=eps)``).

    The N samples of every observation run as one batch of B*N rows, each
    with its own standard normal ``noise`` of ``noise_shape`` (e.g. (H, D)).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], noise_shape: Sequence[int],
                 input_shapes: Mapping[str, Sequence[int]] | None = None):
        self.fn, self.noise_shape = fn, tuple(int(s) for s in noise_shape)
        self.input_shapes = dict(input_shapes or {})

    @torch.no_grad()
    def sample_actions(self, batch, num_samples, generator):
        b = batch_rows(batch)
        noise = torch.randn((b * num_samples, *self.noise_shape), generator=generator)
        out = self.fn(repeat_rows(batch, num_samples), noise=noise)
        if not isinstance(out, torch.Tensor) or out.shape[0] != b * num_samples:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise MmttsError(f"the policy returned {got} for {b * num_samples} noise rows; it must return one "
                             "action (chunk) per row")
        return out.reshape(b, num_samples, *out.shape[1:])
