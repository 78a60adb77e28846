"""Verifiers for video: image verifiers lifted to frames, temporal consistency, and one verifier per depth.

Videos are (B, C, T, H, W) tensors, frames in [0, 1], as the video processes
return them (a frame-autoregressive preview is a partial video: fewer frames).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ..core.errors import MmttsError
from ..core.registry import VERIFIERS
from ..core.verifier import Verifier, as_verifier

REDUCTIONS = ("mean", "min")


def check_video(outputs: Any, name: str) -> torch.Tensor:
    """The batch as a (B, C, T, H, W) tensor with at least one frame, refused with the fix otherwise."""
    if not isinstance(outputs, torch.Tensor) or outputs.ndim != 5:
        got = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
        raise MmttsError(f"{name} scores video batches (batch, channels, frames, height, width); got {got}")
    if outputs.shape[2] == 0:
        raise MmttsError(f"{name} cannot score clips of zero frames")
    return outputs


def frames_of(videos: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) videos as (B * T, C, H, W) frames, clip by clip."""
    b, c, t, h, w = videos.shape
    return videos.transpose(1, 2).reshape(b * t, c, h, w)


def repeat_context(context: Any, n: int, t: int) -> Any:
    """Per-candidate context (a dict of tensors or lists with ``n`` entries) repeated for each of ``t`` frames."""
    if not isinstance(context, dict):
        return context
    out = {}
    for k, v in context.items():
        if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n:
            out[k] = v.repeat_interleave(t, 0)
        elif isinstance(v, (list, tuple)) and len(v) == n:
            out[k] = [item for item in v for _ in range(t)]
        else:
            out[k] = v
    return out


@VERIFIERS.register("frames")
class FrameVerifier(Verifier):
    """An image verifier lifted to videos: it scores every frame and reduces the scores per clip.

    Its evaluations are the image verifier's, one per frame scored.

    Args:
        verifier: the image verifier (or a scoring function of (N, C, H, W) images).
        reduce: ``"mean"`` or ``"min"`` over frames (min: every frame must pass).
        name: the verifier's name (default ``frames-<reduce>(<image verifier>)``).
    """

    def __init__(self, verifier: Verifier | Callable, reduce: str = "mean", name: str | None = None):
        super().__init__()
        if reduce not in REDUCTIONS:
            raise MmttsError(f"reduce={reduce!r} must be one of {REDUCTIONS}")
        self.verifier, self.reduce = as_verifier(verifier), reduce
        self.name = name or f"frames-{reduce}({self.verifier.name})"

    @property
    def parts(self) -> tuple[Verifier, ...]:
        return (self.verifier,)

    def score(self, outputs, context=None):
        v = check_video(outputs, self.name)
        b, t = v.shape[0], v.shape[2]
        s = self.verifier(frames_of(v), repeat_context(context, b, t)).reshape(b, t)
        return s.mean(1) if self.reduce == "mean" else s.min(1).values


@VERIFIERS.register("temporal-consistency")
class TemporalConsistency(Verifier):
    """Minus the mean squared change between consecutive frames (0 for a still or single-frame clip).

    In pixel space by default; with ``features`` the change is measured between
    frame features instead (e.g. a classifier's penultimate layer), which
    tolerates motion and penalises a subject that changes identity.

    Args:
        features: maps (N, C, H, W) frames to (N, D) features; None compares pixels.
        name: the verifier's name.
    """

    def __init__(self, features: Callable | None = None, name: str = "temporal-consistency"):
        super().__init__()
        self.features, self.name = features, name

    @torch.no_grad()
    def score(self, outputs, context=None):
        v = check_video(outputs, self.name).float()
        b, t = v.shape[0], v.shape[2]
        if t == 1:
            return torch.zeros(b, dtype=torch.float64)
        f = frames_of(v)
        f = self.features(f) if self.features is not None else f
        f = f.reshape(b, t, -1).float()
        return -(f[:, 1:] - f[:, :-1]).pow(2).mean((1, 2))


@VERIFIERS.register("per-depth")
class PerDepth(Verifier):
    """One verifier per depth of a video: a clip of F frames is scored by the verifier for the most frames <= F.

    This is how a tree search over frame units judges each depth by its own
    criterion (hierarchical prompts: the static scene first, then the motion,
    then the whole clip). Its evaluations are its members'.

    Args:
        verifiers: {frames: verifier}; ``{1: a, 3: b}`` scores clips of 1-2 frames with ``a`` and longer ones
            with ``b``.
        name: the verifier's name.
    """

    def __init__(self, verifiers: Mapping[int, Verifier | Callable], name: str = "per-depth"):
        super().__init__()
        if not verifiers:
            raise MmttsError("PerDepth needs at least one {frames: verifier} entry")
        bad = [k for k in verifiers if isinstance(k, bool) or not isinstance(k, int) or k < 1]
        if bad:
            raise MmttsError(f"PerDepth keys {bad} must be frame counts >= 1")
        self.by_frames = {int(k): as_verifier(v) for k, v in sorted(verifiers.items())}
        self.name = name

    @property
    def parts(self) -> tuple[Verifier, ...]:
        return tuple(self.by_frames.values())

    def verifier_for(self, frames: int) -> Verifier:
        keys = [k for k in self.by_frames if k <= frames]
        if not keys:
            raise MmttsError(f"{self.name} has no verifier for clips of {frames} frame(s); its entries start at "
                             f"{min(self.by_frames)} frames: add an entry for 1")
        return self.by_frames[max(keys)]

    def score(self, outputs, context=None):
        v = check_video(outputs, self.name)
        return self.verifier_for(v.shape[2])(v, context)
