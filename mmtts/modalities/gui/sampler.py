"""Click samplers: (screenshot, instruction) -> one answer per seed at a temperature, as text.

Any model that can be asked for answers is a :class:`ClickSampler`; it
declares the coordinate space its answers are written in, and the parser
takes it from there, so a real vision-language model and the project's
small grounding model go through the same voting and metrics. Temperature 0
means greedy decoding. Answer i is drawn from ``seeds[i]`` alone: the same
seed gives the same answer whatever other seeds are drawn beside it, which
is how :class:`~mmtts.modalities.gui.process.ClickProcess` gives every
candidate its own random stream.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image

from ...core.errors import MmttsError
from ...core.rng import Streams
from .coords import CoordSpace
from .model import (INPUT_SIZE, GroundingNet, argmax_point, boxes_at, cells_at, cells_to_unit, greedy_digits,
                    image_tensor, tokenize)


@runtime_checkable
class ClickSampler(Protocol):
    #: the coordinate space of the answers
    space: CoordSpace

    def sample(self, image: Image.Image, instruction: str, seeds: Sequence[int], temperature: float) -> list[str]:
        """One answer per seed for one instruction on one screenshot; answer i depends on ``seeds[i]`` only."""


def check_sampling(seeds: Sequence[int], temperature: float) -> torch.Tensor:
    """The seeds as an int64 tensor (n,), after checking them and the temperature."""
    if isinstance(seeds, (int, np.integer)) or (isinstance(seeds, torch.Tensor) and seeds.ndim == 0):
        raise MmttsError(f"seeds={seeds} is one number; pass one integer seed per answer, e.g. "
                         f"Streams.spawn({seeds}, n).draw_seeds() for n answers")
    try:
        out = torch.as_tensor(list(seeds) if not isinstance(seeds, torch.Tensor) else seeds, dtype=torch.int64)
    except (TypeError, ValueError, RuntimeError):
        raise MmttsError(f"seeds must be a sequence of integers, one per answer; got {type(seeds).__name__}") \
            from None
    if out.ndim != 1 or len(out) == 0:
        raise MmttsError(f"asked for {out.numel()} answers (seeds of shape {tuple(out.shape)}); pass a 1-D "
                         "sequence with one seed per answer, at least one")
    if not temperature >= 0:
        raise MmttsError(f"temperature={temperature} must be >= 0 (0 is greedy decoding)")
    return out


class HeatmapSampler:
    """The project's grounding model as a sampler, answering "(x, y)" in thousandths like Qwen-VL.

    Samples are exact draws from softmax(logits / T): each seed gives three
    uniforms, one picking the cell by inverse CDF, two placing the click
    inside it. The model runs once per call, whatever the number of seeds.

    Args:
        model: a :class:`GroundingNet` (or a :class:`BoxGrounding` for box answers).
        greedy: what temperature 0 returns: "digits" decodes the answer text digit by digit as a language
            model does (what greedy means for a VLM); "argmax" is the most likely point, which a VLM cannot compute.
        answer: "point" answers "(x, y)"; "box" (a model with boxes) answers "[x1, y1, x2, y2]" in thousandths,
            the box its box network gives under the chosen cell (the sampled one, or the greedy click's). The
            box's centre is the click the metric scores; region voting votes with the boxes themselves.
    """

    space = CoordSpace("permille")
    #: the size the model sees; callers may pass images already resized to it
    input_size = INPUT_SIZE

    def __init__(self, model: GroundingNet, greedy: str = "digits", answer: str = "point"):
        if greedy not in ("digits", "argmax"):
            raise MmttsError(f"greedy={greedy!r}; choose 'digits' (as a VLM decodes) or 'argmax'")
        if answer not in ("point", "box"):
            raise MmttsError(f"answer={answer!r}; choose 'point' or 'box'")
        if answer == "box" and not getattr(model, "has_boxes", False):
            raise MmttsError("answer='box' needs a model that gives boxes; pair the policy with an ElementBoxNet "
                             "in BoxGrounding(policy, boxes)")
        self.model = model.eval()
        self.greedy = greedy
        self.answer = answer

    @torch.no_grad()
    def logits(self, image: Image.Image, instruction: str) -> torch.Tensor:
        return self.model(image_tensor([image]), tokenize([instruction]))

    def sample(self, image: Image.Image, instruction: str, seeds: Sequence[int], temperature: float) -> list[str]:
        seeds = check_sampling(seeds, temperature)
        k = len(seeds)
        if self.answer == "box":
            with torch.no_grad():
                logits, extents = self.model.forward_with_boxes(image_tensor([image]), tokenize([instruction]))
        else:
            logits, extents = self.logits(image, instruction), None
        cols, rows = self.model.cells
        if temperature == 0:
            if self.greedy == "digits":
                x, y = greedy_digits(logits)[0].tolist()
            else:
                x, y = (argmax_point(logits)[0] * 1000).floor().long().tolist()
            if extents is None:
                return [f"({x}, {y})"] * k
            cells = torch.tensor([[y * rows // 1000 * cols + x * cols // 1000]])
            return [_box_text(boxes_at(extents, cells)[0, 0])] * k
        u = Streams(seeds).rand((3,))  # per answer: the cell, then the click's place inside it
        cells = cells_at(logits.flatten(1), u[None, :, 0], float(temperature))[0]
        if extents is not None:
            return [_box_text(b) for b in boxes_at(extents, cells[None])[0]]
        thousandths = (cells_to_unit(cells, u[:, 1:]) * 1000).floor().long().clamp(0, 999)
        return [f"({x}, {y})" for x, y in thousandths.tolist()]


def _box_text(box: torch.Tensor) -> str:
    """A box as fractions (4,) -> "[x1, y1, x2, y2]" in thousandths."""
    x1, y1, x2, y2 = (box * 1000).round().long().clamp(0, 1000).tolist()
    return f"[{x1}, {y1}, {x2}, {y2}]"


class TransformersSampler:
    """A Hugging Face vision-language model (``generate``) with its processor, as a click sampler.

    All answers of one call are generated as one batch. When sampling, each
    row chooses its next token by the Gumbel-max trick with noise from its
    own seed and the token position (:class:`SeededTokenChoice`), so an
    answer does not depend on the other seeds of the call.

    Args:
        model: a transformers generative model (it has ``generate``).
        processor: its processor (images and text in, model inputs out).
        space: the model's answer space: 'permille' for Qwen-VL style, 'resized:WxH' for models that answer in
            the pixels of their resized input, 'pixel' or 'unit'.
        prompt: formatted with ``{instruction}``; it must hold whatever image placeholder the processor expects.
        chat: build the prompt with the processor's chat template instead.
        max_new_tokens: the longest answer generated.
        top_p: nucleus sampling: each token is drawn among the most likely tokens holding ``top_p`` of the
            probability (1 keeps every token).
        share_prompt: run the prompt once and share its cache among the answers (same answers, less work; for
            models whose positions do not depend on the image past the first step, such as LLaVA).
    """

    def __init__(self, model, processor, space: CoordSpace | str = "pixel",
                 prompt: str = "{instruction}", chat: bool = False, max_new_tokens: int = 32, top_p: float = 1.0,
                 share_prompt: bool = False):
        if not hasattr(model, "generate"):
            raise MmttsError(f"{type(model).__name__} has no generate(); pass a transformers generative model")
        self.model = model.eval()
        self.processor = processor
        self.space = CoordSpace.parse(space)
        self.prompt = prompt
        self.chat = chat
        self.max_new_tokens = int(max_new_tokens)
        if not 0 < top_p <= 1:
            raise MmttsError(f"top_p={top_p} must be in (0, 1] (1 keeps every token)")
        self.top_p = float(top_p)
        self.share_prompt = bool(share_prompt)

    def _text(self, instruction: str) -> str:
        text = self.prompt.format(instruction=instruction)
        if not self.chat:
            return text
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def sample(self, image: Image.Image, instruction: str, seeds: Sequence[int], temperature: float) -> list[str]:
        from .transformers_sampler import generate_answers

        return generate_answers(self.model, self.processor, image, self._text(instruction), seeds, temperature,
                                self.top_p, self.max_new_tokens, self.share_prompt).texts


class SeededTokenChoice:
    """A logits processor that samples each row's next token from softmax(scores / T) with that row's own seed.

    Gumbel-max: the token maximising scores / T + G, with G standard
    Gumbel noise drawn from the stream (seed of the row, position of the
    token), among the nucleus of softmax(scores / T) when ``top_p`` < 1.
    The returned logits are 0 at that token and -inf elsewhere.

    Args:
        seeds: one seed per row of the generated batch, int64 (rows,).
        temperature: the sampling temperature, > 0.
        top_p: keep the most likely tokens holding this much probability (1 keeps all).
    """

    def __init__(self, seeds: torch.Tensor, temperature: float, top_p: float = 1.0):
        self.seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1)
        self.temperature = float(temperature)
        self.top_p = float(top_p)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if len(scores) != len(self.seeds):
            raise MmttsError(f"{len(scores)} rows to sample for {len(self.seeds)} seeds; pass one seed per row")
        position = torch.full_like(self.seeds, input_ids.shape[1])
        u = Streams(self.seeds, position).rand((scores.shape[1],))
        gumbel = -torch.log(-torch.log(u))      # u = 0 gives -inf: that token is never chosen
        from .transformers_sampler import nucleus

        pick = (nucleus(scores.detach().double().cpu() / self.temperature, self.top_p) + gumbel).argmax(1)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(out)), pick.to(out.device)] = 0.0
        return out
