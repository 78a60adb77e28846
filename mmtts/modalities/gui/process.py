"""Click sampling as a Process: one stage is one draw of K click answers for one instruction.

This lets region voting run as an ordinary strategy (``region-vote``)
through :func:`mmtts.core.strategy.run_strategy`, with its budget counted
in samples (one NFE per answer).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ...core.process import Process
from ...core.rng import Streams, derive_seed
from ...core.state import State
from .parse import parse_answers
from .sampler import ClickSampler


class ClickProcess(Process):
    """K answers of ``sampler`` for ``instruction`` on ``image``, parsed into pixels of the original screenshot.

    ``image_size`` is the original screenshot's (width, height), which may
    differ from ``image`` when a caller passes it already resized for the
    model. Outputs are ``points`` (K, 2), ``boxes`` (K, 4; NaN for point
    answers) and ``parsed`` (K,); unparseable answers are NaN rows.
    """

    num_stages = 1
    nfe_per_stage = 1

    def __init__(self, sampler: ClickSampler, image: Image.Image, instruction: str,
                 image_size: tuple[int, int], temperature: float = 1.0):
        self.sampler = sampler
        self.image = image
        self.instruction = instruction
        self.extent = (int(image_size[0]), int(image_size[1]))
        self.temperature = float(temperature)
        self.texts: list[str] = []

    def init(self, streams: Streams, first_index: int = 0) -> State:
        n = len(streams)
        data = {"points": torch.full((n, 2), float("nan"), dtype=torch.float64),
                "boxes": torch.full((n, 4), float("nan"), dtype=torch.float64),
                "parsed": torch.zeros(n, dtype=torch.bool)}
        return State.fresh(data, streams, first_index)

    def step(self, state: State) -> State:
        seed = derive_seed(*state.streams.seeds.tolist(), *state.streams.counters.tolist())
        texts = self.sampler.sample(self.image, self.instruction, len(state), self.temperature, seed)
        if len(texts) != len(state):
            raise RuntimeError(f"{type(self.sampler).__name__} returned {len(texts)} answers for {len(state)} samples")
        self.texts = list(texts)
        state.streams.counters += 1
        p = parse_answers(texts, self.sampler.space, self.extent)
        data = {"points": torch.from_numpy(p.points), "boxes": torch.from_numpy(p.boxes),
                "parsed": torch.from_numpy(np.asarray(p.ok))}
        return State(data, state.stage + 1, state.streams, state.ids, state.parents, state.origin, state.meta)

    def finish(self, state: State) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in state.data.items()}
