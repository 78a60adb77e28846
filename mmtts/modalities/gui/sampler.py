"""Click samplers: (screenshot, instruction) -> K answers at a temperature, as text.

Any model that can be asked for K answers is a :class:`ClickSampler`; it
declares the coordinate space its answers are written in, and the parser
takes it from there, so a real vision-language model and the project's
small grounding model go through the same voting and metrics. Temperature 0
means greedy decoding; ``seed`` makes sampling reproducible.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from PIL import Image

from ...core.errors import MmttsError
from .coords import CoordSpace
from .model import (INPUT_SIZE, GroundingNet, argmax_point, boxes_at, cells_to_unit, greedy_digits, image_tensor,
                    sample_cells, tokenize)


@runtime_checkable
class ClickSampler(Protocol):
    #: the coordinate space of the answers
    space: CoordSpace

    def sample(self, image: Image.Image, instruction: str, k: int, temperature: float, seed: int) -> list[str]:
        """``k`` answers for one instruction on one screenshot."""


def check_sampling(k: int, temperature: float) -> None:
    if int(k) != k or k < 1:
        raise MmttsError(f"asked for k={k} answers; K must be a whole number >= 1")
    if not temperature >= 0:
        raise MmttsError(f"temperature={temperature} must be >= 0 (0 is greedy decoding)")


class HeatmapSampler:
    """The project's grounding model as a sampler, answering "(x, y)" in thousandths like Qwen-VL.

    Samples are exact draws from softmax(logits / T). ``greedy`` says what
    temperature 0 returns: "digits" decodes the answer text digit by digit as
    a language model does (the default, what greedy means for a VLM);
    "argmax" returns the most likely point, which a VLM cannot compute.

    ``answer="box"`` (a model with boxes, :class:`BoxGrounding`) answers
    "[x1, y1, x2, y2]" in thousandths instead: the box its box network gives
    under the chosen cell (the sampled one, or the cell of the greedy click).
    The box's centre is the click the metric scores; region voting votes
    with the boxes themselves.
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

    def sample(self, image: Image.Image, instruction: str, k: int, temperature: float, seed: int) -> list[str]:
        check_sampling(k, temperature)
        k = int(k)
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
        g = torch.Generator().manual_seed(int(seed))
        cells = sample_cells(logits.flatten(1), k, float(temperature), g)[0]
        if extents is not None:
            return [_box_text(b) for b in boxes_at(extents, cells[None])[0]]
        jitter = torch.rand(k, 2, generator=g, dtype=torch.float64)
        thousandths = (cells_to_unit(cells, jitter) * 1000).floor().long().clamp(0, 999)
        return [f"({x}, {y})" for x, y in thousandths.tolist()]


def _box_text(box: torch.Tensor) -> str:
    """A box as fractions (4,) -> "[x1, y1, x2, y2]" in thousandths."""
    x1, y1, x2, y2 = (box * 1000).round().long().clamp(0, 1000).tolist()
    return f"[{x1}, {y1}, {x2}, {y2}]"


class TransformersSampler:
    """A Hugging Face vision-language model (``generate``) with its processor, as a click sampler.

    ``prompt`` is formatted with ``{instruction}`` and must hold whatever
    image placeholder the processor expects (or pass ``chat=True`` to build
    it with the processor's chat template). ``space`` is the model's answer
    space: 'permille' for Qwen-VL style, 'resized:WxH' for models that answer
    in the pixels of their resized input, 'pixel' or 'unit'.
    """

    def __init__(self, model, processor, space: CoordSpace | str = "pixel",
                 prompt: str = "{instruction}", chat: bool = False, max_new_tokens: int = 32):
        if not hasattr(model, "generate"):
            raise MmttsError(f"{type(model).__name__} has no generate(); pass a transformers generative model")
        self.model = model.eval()
        self.processor = processor
        self.space = CoordSpace.parse(space)
        self.prompt = prompt
        self.chat = chat
        self.max_new_tokens = int(max_new_tokens)

    def _text(self, instruction: str) -> str:
        text = self.prompt.format(instruction=instruction)
        if not self.chat:
            return text
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    @torch.no_grad()
    def sample(self, image: Image.Image, instruction: str, k: int, temperature: float, seed: int) -> list[str]:
        check_sampling(k, temperature)
        inputs = self.processor(images=image, text=self._text(instruction), return_tensors="pt")
        greedy = temperature == 0
        kwargs = {"do_sample": False} if greedy else {"do_sample": True, "temperature": float(temperature),
                                                       "top_k": 0, "top_p": 1.0}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens,
                                      num_return_sequences=1 if greedy else int(k), **kwargs)
        texts = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return texts * int(k) if greedy else texts
