"""Training the text-answering VLM (:mod:`mmtts.modalities.gui.vlm`) on rendered screens.

Each training example is a screenshot, an instruction from the renderer
and, as the answer, a click drawn uniformly inside the target element's box
(drawn anew every time the example is used), written in thousandths as the
model answers: ``(x,y)``. A config with ``"answer": "box"`` trains the
model to write the target element's own box instead, ``[x1,y1,x2,y2]`` in
thousandths (edges rounded outward), the same text every time. The loss is the decoder's cross-entropy on the
answer tokens and the end-of-sequence token only; the prompt is context.
"""

from __future__ import annotations

import numpy as np
import torch

from ...core.threads import one_thread
from .render import instructions, render_screen
from .train import _fit
from .vlm import answer_format, answer_text, box_text, build_vlm, image_tokens, prompt_text, vocabulary

IGNORE = -100


def screen_examples(config: dict, processor) -> dict:
    """The training screens of ``config`` as pixel values (S, 3, side, side), with per instruction: ``screen``
    (its screenshot's row), ``prompt`` (token ids, the image tokens expanded), ``boxes`` (thousandths)."""
    rng = np.random.default_rng(config["seed"])
    seeds = np.arange(config["screens"]) + config["seed"] * 1_000_003
    images, screen, prompts, boxes = [], [], [], []
    n_image = image_tokens(config)
    for i, s in enumerate(seeds):
        sc = render_screen(int(s))
        images.append(processor.image_processor(images=sc.image, return_tensors="pt")["pixel_values"][0])
        w, h = sc.size
        for el, _, text in instructions(sc, config["per_screen"], rng):
            screen.append(i)
            ids = processor.tokenizer(prompt_text(text).replace("<image>", "<image>" * n_image))["input_ids"]
            prompts.append(ids)
            x1, y1, x2, y2 = el.box
            boxes.append((x1 / w * 1000, y1 / h * 1000, x2 / w * 1000, y2 / h * 1000))
    return {"pixel_values": torch.stack(images), "screen": torch.tensor(screen), "prompts": prompts,
            "boxes": np.asarray(boxes, dtype=np.float64)}


def answer_ids(x: int, y: int, vocab: dict[str, int]) -> list[int]:
    """Token ids of the answer "(x,y)" followed by the end of sequence (one token per character)."""
    return [vocab[c] for c in answer_text(x, y)] + [vocab["</s>"]]


def box_ids(box, vocab: dict[str, int]) -> list[int]:
    """Token ids of the box answer "[x1,y1,x2,y2]" for a box in thousandths (x1, y1 floored, x2, y2 ceiled,
    within 0-1000), followed by the end of sequence."""
    x1, y1, x2, y2 = np.asarray(box, dtype=np.float64)
    edges = (*np.clip(np.floor([x1, y1]), 0, 1000), *np.clip(np.ceil([x2, y2]), 0, 1000))
    return [vocab[c] for c in box_text(*edges)] + [vocab["</s>"]]


def training_batch(data: dict, idx: np.ndarray, rng: np.random.Generator, vocab: dict[str, int],
                   answer: str = "point") -> dict:
    """Model inputs for examples ``idx``: prompts and their answers (clicks drawn afresh, or the target's box),
    right-padded; labels on answers only."""
    rows, labels = [], []
    for i in idx:
        x1, y1, x2, y2 = data["boxes"][i]
        if answer == "box":
            target = box_ids(data["boxes"][i], vocab)
        else:
            x = int(np.clip(np.floor(rng.uniform(x1, x2)), 0, 999))
            y = int(np.clip(np.floor(rng.uniform(y1, y2)), 0, 999))
            target = answer_ids(x, y, vocab)
        prompt = data["prompts"][i]
        rows.append(prompt + target)
        labels.append([IGNORE] * len(prompt) + target)
    length = max(len(r) for r in rows)
    pad = vocab["<pad>"]
    ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])
    lab = torch.tensor([r + [IGNORE] * (length - len(r)) for r in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": lab,
            "pixel_values": data["pixel_values"][data["screen"][torch.as_tensor(idx)]]}


def train_vlm(config: dict) -> dict[str, torch.Tensor]:
    """Train the VLM of ``config`` (``screens`` x ``per_screen`` examples, ``steps`` AdamW steps of ``batch``,
    one-cycle schedule peaking at ``lr``, answers as ``config["answer"]``) on one thread; returns its state dict."""
    with one_thread():
        torch.manual_seed(config["seed"])
        model, processor = build_vlm(config)
        data = screen_examples(config, processor)
        vocab, answer = vocabulary(), answer_format(config)
        rng = np.random.default_rng(config["seed"] + 1)
        n = len(data["prompts"])
        model.train()

        def loss(g: torch.Generator) -> torch.Tensor:
            idx = torch.randint(n, (config["batch"],), generator=g).numpy()
            return model(**training_batch(data, idx, rng, vocab, answer)).loss

        state = _fit(model, config, loss, "training gui vlm")
        return {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
