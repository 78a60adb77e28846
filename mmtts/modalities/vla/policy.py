"""Policies that can sample, and the LeRobot-shaped observation batches they read.

The action process needs two things from a policy, so that every candidate
is a pure function of its observation and its own random stream:
``draw_noise(streams, space)`` draws each candidate's sampling noise from its
stream (one row per candidate), and ``actions_from_noise(batch, noise)``
turns observation rows and their noise into actions (M, D) or chunks
(M, H, D), one policy row per candidate. ``sample_actions(batch, num_samples,
generator)`` draws N actions per observation from a generator, for direct
use. Two adapters cover the common kinds: a Gaussian head (a temperature
scales its standard deviation) and a policy that takes its noise as an
argument, as flow-matching policies do (``noise=``). The token adapter for
discretised-action VLMs is in ``tokens.py``.

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
from ...core.rng import Streams
from ...core.settings import real, whole

STATE_KEY = "observation.state"


@runtime_checkable
class SamplingPolicy(Protocol):
    def draw_noise(self, streams: Streams, space: Any) -> torch.Tensor:
        """Each candidate's sampling noise from its own stream: (M, *noise shape)."""

    def actions_from_noise(self, batch: Mapping[str, Any], noise: torch.Tensor) -> torch.Tensor:
        """One action (M, D) or chunk (M, H, D) per observation row and noise row."""


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


def as_observations(batch: Mapping[str, Any], dtype: torch.dtype | None) -> dict[str, Any]:
    """The batch with numpy arrays as tensors and floating tensors in the policy's ``dtype``.

    These conversions are unambiguous (a gymnasium observation is a float64
    numpy array; the policy's weights decide the precision), so they are made
    rather than refused; numpy arrays of text or objects become lists.
    Anything else is left for the shape checks.
    """
    if not isinstance(batch, Mapping):
        return batch
    out = {}
    for k, v in batch.items():
        if type(v).__module__ == "numpy" and hasattr(v, "dtype"):
            v = torch.as_tensor(v) if v.dtype.kind in "biuf" else v.tolist()  # numbers; text and objects as lists
        if isinstance(v, torch.Tensor) and v.is_floating_point() and dtype is not None and v.dtype != dtype:
            v = v.to(dtype)
        out[k] = v
    return out


def parameter_dtype(obj: Any) -> torch.dtype | None:
    """The floating dtype of the first parameter of ``obj`` or of the module it wraps (None when it has none)."""
    for m in (obj, getattr(obj, "module", None), getattr(obj, "model", None)):
        if isinstance(m, nn.Module):
            for p in m.parameters():
                if p.is_floating_point():
                    return p.dtype
    return None


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
    rows = next(iter(sizes.values()))
    if rows == 0:
        raise MmttsError("the observation batch is empty (0 observations); skip the call when there is nothing to "
                         "act on")
    return rows


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
        if v.is_complex():
            raise MmttsError(f"observation {key!r} has dtype {v.dtype}; pass real numbers")
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

    A sample is ``mean + temperature * exp(log_std) * noise`` with standard
    normal noise. In the action process every candidate is one row of the
    head's forward (as every sample of a VLA is a forward), so the policy
    forwards counted by a search are the rows the head ran.

    Args:
        module: the head, ``state (M, S) -> (mean, log_std)``, each (M, D) or (M, H, D).
        state_dim: S, the length of ``batch[state_key]`` per observation.
        temperature: scales the standard deviation (1: the trained distribution; 0: the mean).
        state_key: where the state lies in the observation batch.
        horizon: H for a head that outputs action chunks (M, H, D); None for single actions (M, D).
    """

    def __init__(self, module: nn.Module, state_dim: int, temperature: float = 1.0, state_key: str = STATE_KEY,
                 horizon: int | None = None):
        super().__init__()
        temperature = real("temperature", temperature, "GaussianPolicy", low=0.0)
        horizon = whole("horizon", horizon, "GaussianPolicy", none=True)
        self.module, self.temperature, self.state_key, self.horizon = module, temperature, state_key, horizon
        self.input_shapes = {state_key: (whole("state_dim", state_dim, "GaussianPolicy"),)}

    def _sample(self, mean: torch.Tensor, log_std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return mean + (log_std.exp() * self.temperature) * noise

    def draw_noise(self, streams: Streams, space) -> torch.Tensor:
        shape = (space.dim,) if self.horizon is None else (self.horizon, space.dim)
        return streams.randn(shape)

    def _head(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's (mean, log_std) for the batch's state; an integer or bool state is read as numbers in the
        head's dtype."""
        state = batch[self.state_key]
        if not state.is_floating_point():
            state = state.to(parameter_dtype(self.module) or torch.get_default_dtype())
        return self.module(state)

    @torch.no_grad()
    def actions_from_noise(self, batch, noise):
        mean, log_std = self._head(batch)
        if mean.shape[-1] != noise.shape[-1]:
            raise MmttsError(f"the policy head outputs actions of {mean.shape[-1]} dimensions, but the action space "
                             f"has {noise.shape[-1]}; pass an ActionSpace with the head's dimensions")
        return self._sample(mean, log_std, noise.to(mean.device, mean.dtype))

    @torch.no_grad()
    def sample_actions(self, batch, num_samples, generator):
        """``num_samples`` actions per observation (B, N, D) from one forward per observation."""
        mean, log_std = self._head(batch)
        eps = torch.randn((mean.shape[0], num_samples, *mean.shape[1:]), generator=generator,
                          dtype=mean.dtype).to(mean.device)
        return self._sample(mean[:, None], log_std[:, None], eps)

    @torch.no_grad()
    def select_action(self, batch) -> torch.Tensor:
        """The mean action (LeRobot's deterministic ``select_action``)."""
        check_shapes(batch, self.input_shapes)
        return self._head(batch)[0]


class NoisePolicy:
    """A policy that takes its sampling noise as an argument (flow matching: ``fn(batch, noise=eps)``).

    Every candidate is one row of the call, with its own standard normal
    ``noise`` of ``noise_shape``.

    Args:
        fn: ``fn(batch, noise=eps) -> actions``: a batch of M observation rows and (M, *noise_shape) noise
            give (M, D) actions or (M, H, D) chunks.
        noise_shape: the noise of one sample, e.g. (H, D).
        input_shapes: observation key -> shape per observation, checked before every call.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], noise_shape: Sequence[int],
                 input_shapes: Mapping[str, Sequence[int]] | None = None):
        if not callable(fn):
            raise MmttsError(f"NoisePolicy needs fn(batch, noise=eps) -> actions, not {type(fn).__name__}")
        try:
            dims = tuple(noise_shape)
        except TypeError:
            raise MmttsError(f"noise_shape={noise_shape!r} must be a tuple such as (horizon, action_dim)") from None
        self.fn = fn
        self.noise_shape = tuple(whole(f"noise_shape[{i}]", d, "NoisePolicy") for i, d in enumerate(dims))
        self.input_shapes = dict(input_shapes or {})

    def draw_noise(self, streams: Streams, space) -> torch.Tensor:
        return streams.randn(self.noise_shape)

    @torch.no_grad()
    def actions_from_noise(self, batch, noise):
        out = self.fn(batch, noise=noise)
        if not isinstance(out, torch.Tensor) or out.shape[0] != noise.shape[0]:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise MmttsError(f"the policy returned {got} for {noise.shape[0]} noise rows; it must return one "
                             "action (chunk) per row")
        return out

    def sample_actions(self, batch, num_samples, generator):
        """``num_samples`` actions per observation (B, N, ...): B x N rows in one call."""
        b = batch_rows(batch)
        noise = torch.randn((b * num_samples, *self.noise_shape), generator=generator)
        out = self.actions_from_noise(repeat_rows(batch, num_samples), noise)
        return out.reshape(b, num_samples, *out.shape[1:])
