"""Click sampling as a Process: one stage is one draw of an answer per candidate for one instruction.

This lets region voting run as an ordinary strategy (``region-vote``)
through :func:`mmtts.search`, with its budget counted in samples (one NFE
per answer). Each candidate's answer comes from its own random stream, so
a run's answers do not depend on how its candidates are batched.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ...core.errors import ProcessError
from ...core.process import Process
from ...core.rng import Streams
from ...core.state import State
from ...strategies.region_vote import check_extent
from .elements import ElementProposals
from .parse import parse_answers
from .sampler import ClickSampler

#: characters of each answer's text kept in the State (parsing reads the whole text)
TEXT_CHARS = 256


class ClickProcess(Process):
    """Answers of ``sampler`` for ``instruction`` on ``image``, parsed into pixels of the original screenshot.

    Outputs are ``points`` (n, 2), ``boxes`` (n, 4; NaN for point answers),
    ``parsed`` (n,) and ``texts`` (n answers as written, up to
    ``TEXT_CHARS`` characters); unparseable answers are NaN rows. The
    texts travel in the State as code points (``text``, (n, TEXT_CHARS)
    int32, 0-padded), so they follow their candidates when a batch is
    indexed or concatenated. With ``elements``, outputs also hold
    ``elements`` (n, 4): the box of the element under each answer's point
    (NaN where none is known), which ``region-vote`` with ``snap=True``
    votes with.

    Args:
        sampler: the model as a :class:`ClickSampler`; candidate i's answer is drawn with its stream's next seed.
        image: the screenshot as the sampler takes it (it may be already resized for the model).
        instruction: what to click.
        image_size: the original screenshot's (width, height): the pixels answers are parsed into, and the
            process's ``extent``.
        temperature: sampling temperature; 0 is greedy decoding.
        elements: where the screenshot's UI elements are (:mod:`.elements`: a list of boxes or a detector's
            proposals); None records none.
    """

    num_stages = 1
    nfe_per_stage = 1

    def __init__(self, sampler: ClickSampler, image: Image.Image, instruction: str,
                 image_size: tuple[int, int], temperature: float = 1.0, elements: ElementProposals | None = None):
        if elements is not None and not isinstance(elements, ElementProposals):
            raise ProcessError(f"elements must be ElementProposals (an ElementList of boxes or DetectedElements), "
                               f"got a {type(elements).__name__}")
        self.elements = elements
        self.sampler = sampler
        self.image = image
        self.instruction = instruction
        self.extent = check_extent(*image_size)
        self.temperature = float(temperature)

    def init(self, streams: Streams, first_index: int = 0) -> State:
        n = len(streams)
        data = {"points": torch.full((n, 2), float("nan"), dtype=torch.float64),
                "boxes": torch.full((n, 4), float("nan"), dtype=torch.float64),
                "parsed": torch.zeros(n, dtype=torch.bool),
                "text": torch.zeros(n, TEXT_CHARS, dtype=torch.int32)}
        if self.elements is not None:
            data["elements"] = torch.full((n, 4), float("nan"), dtype=torch.float64)
        return State.fresh(data, streams, first_index)

    def step(self, state: State) -> State:
        seeds = state.streams.draw_seeds()  # the seed of each stream's next draw
        state.streams.counters += 1
        texts = self.sampler.sample(self.image, self.instruction, seeds, self.temperature)
        if len(texts) != len(state):
            raise ProcessError(f"{type(self.sampler).__name__} returned {len(texts)} answers for {len(state)} seeds; "
                               "a sampler gives one answer per seed")
        p = parse_answers(texts, self.sampler.space, self.extent)
        data = {"points": torch.from_numpy(p.points), "boxes": torch.from_numpy(p.boxes),
                "parsed": torch.from_numpy(np.asarray(p.ok)), "text": encode_texts(texts)}
        if self.elements is not None:
            data["elements"] = torch.from_numpy(self.elements.boxes_at(p.points))
        return State(data, state.stage + 1, state.streams, state.ids, state.parents, state.origin, state.meta)

    def finish(self, state: State) -> dict:
        out = {k: v.clone() for k, v in state.data.items() if k != "text"}
        out["texts"] = decode_texts(state.data["text"])
        return out


def encode_texts(texts: list[str]) -> torch.Tensor:
    """Texts -> int32 code points (n, TEXT_CHARS), 0-padded; longer texts keep their first TEXT_CHARS characters."""
    out = torch.zeros(len(texts), TEXT_CHARS, dtype=torch.int32)
    for row, t in zip(out, texts):
        codes = [ord(c) for c in str(t)[:TEXT_CHARS]]
        row[:len(codes)] = torch.tensor(codes, dtype=torch.int32)
    return out


def decode_texts(codes: torch.Tensor) -> list[str]:
    """The inverse of :func:`encode_texts` (trailing padding dropped)."""
    return ["".join(map(chr, row[row != 0].tolist())) for row in codes]
