"""Verifiers for video: image verifiers lifted to frames, temporal consistency, one verifier per depth, and a
checklist of yes/no questions judged by a vision-language model.

Videos are (B, C, T, H, W) tensors, frames in [0, 1], as the video processes
return them (a frame-autoregressive preview is a partial video: fewer frames).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
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


FRAME_VIEWS = ("grid", "first", "middle", "last")


def frame_image(video: torch.Tensor, view: str) -> np.ndarray:
    """One clip (C, T, H, W) in [0, 1] as the RGB uint8 image (H, W', 3) a vision-language model sees: its frames
    side by side (``grid``) or one of them."""
    t = video.shape[1]
    if view == "grid":
        img = torch.cat(list(video.unbind(1)), dim=-1)
    else:
        img = video[:, {"first": 0, "middle": t // 2, "last": t - 1}[view]]
    img = img.expand(3, *img.shape[1:]) if img.shape[0] == 1 else img[:3]
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@VERIFIERS.register("checklist")
class ChecklistJudge(Verifier):
    """Weighted yes/no questions about each clip answered by a transformers vision-language model, scored by P(yes).

    For each question the model reads the clip's image and the prompt, and
    P(yes) is the softmax of its next-token logits over the yes and no tokens
    only (the answer's probability given that it is yes or no). The score is
    the weighted mean of P(yes) over the questions, in [0, 1]. This is the
    shape of VisionReward-style video judges; a question list per depth goes
    in :class:`PerDepth`.

    Args:
        model: a transformers vision-language model whose forward returns ``logits`` (LLaVA, Qwen-VL, ...).
        processor: its processor: ``processor(images=..., text=..., return_tensors="pt")`` gives the inputs.
        questions: the questions, each a string (weight 1) or a (question, weight) pair.
        template: the prompt around a question, as the model expects it (e.g. ``"<image>{question}"``).
        view: what the model sees of a clip: ``grid`` (the frames side by side), ``first``, ``middle`` or ``last``.
        yes: the answer word for yes (one token of the model's tokenizer).
        no: the answer word for no.
        batch_size: clips per forward.
        name: the verifier's name.
    """

    def __init__(self, model, processor, questions, template: str = "{question}", view: str = "grid",
                 yes: str = "yes", no: str = "no", batch_size: int = 16, name: str = "checklist"):
        super().__init__()
        if view not in FRAME_VIEWS:
            raise MmttsError(f"view={view!r} must be one of {FRAME_VIEWS}")
        if "{question}" not in template:
            raise MmttsError(f"template {template!r} must contain '{{question}}' where each question goes")
        items = [(q, 1.0) if isinstance(q, str) else (str(q[0]), float(q[1])) for q in questions]
        if not items or any(w < 0 for _, w in items) or sum(w for _, w in items) <= 0:
            raise MmttsError("questions must be a non-empty list of questions or (question, weight >= 0) pairs "
                             "with a positive total weight")
        self.model, self.processor = model.eval(), processor
        self.questions = [q for q, _ in items]
        self.weights = torch.tensor([w for _, w in items], dtype=torch.float64)
        self.template, self.view, self.batch_size, self.name = template, view, int(batch_size), name
        self.answer_ids = torch.tensor([self._token(yes), self._token(no)])

    def _token(self, word: str) -> int:
        tok = self.processor.tokenizer
        ids = tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1 or ids[0] == tok.unk_token_id:
            raise MmttsError(f"the answer word {word!r} is not one token of the model's tokenizer ({ids}); pass "
                             "yes=/no= words it has as single tokens")
        return int(ids[0])

    @torch.no_grad()
    def p_yes(self, images: list, question: str) -> torch.Tensor:
        """P(yes | yes or no) of each image for one question (float64)."""
        dev = next(self.model.parameters()).device
        text = [self.template.format(question=question)] * len(images)
        inputs = self.processor(images=images, text=text, return_tensors="pt", padding=True).to(dev)
        logits = self.model(**inputs).logits
        mask = inputs.get("attention_mask")
        last = (mask.sum(1) - 1) if mask is not None and self.processor.tokenizer.padding_side != "left" else \
            torch.full((len(images),), logits.shape[1] - 1, device=logits.device)
        pick = logits[torch.arange(len(images), device=logits.device), last][:, self.answer_ids.to(logits.device)]
        return pick.float().softmax(-1)[:, 0].double().cpu()

    def score(self, outputs, context=None):
        v = check_video(outputs, self.name)
        images = [frame_image(clip, self.view) for clip in v.float()]
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            p = torch.stack([self.p_yes(chunk, q) for q in self.questions], 1)
            out.append((p * self.weights).sum(1) / self.weights.sum())
        return torch.cat(out)
