"""Training the grounding model on procedural screenshots (labels come from the renderer)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ...core.progress import progress_bar
from ...core.threads import one_thread
from .model import ElementBoxNet, GroundingNet, cell_targets, element_extents, image_tensor, tokenize
from .render import instructions, render_screen


def synthetic_batch(screen_seeds, per_screen: int, seed: int) -> dict:
    """Screens drawn from ``screen_seeds`` with ``per_screen`` instructions each, at model resolution.

    Returns ``images`` (S, 3, H, W) uint8, ``screen_boxes`` (every element's
    box on each screen, pixels) and ``screen_sizes``, and per instruction:
    ``screen`` (its image's row), ``tokens``, ``boxes`` (pixels) and ``sizes``.
    """
    rng = np.random.default_rng(seed)
    images, screen, texts, boxes, sizes, kinds = [], [], [], [], [], []
    screen_boxes, screen_sizes = [], []
    for i, s in enumerate(screen_seeds):
        sc = render_screen(int(s))
        images.append((image_tensor([sc.image])[0] * 255).round().to(torch.uint8))
        screen_boxes.append(np.asarray([el.box for el in sc.elements], dtype=np.float64))
        screen_sizes.append(sc.size)
        for el, kind, text in instructions(sc, per_screen, rng):
            kinds.append(kind)
            screen.append(i)
            texts.append(text)
            boxes.append(el.box)
            sizes.append(sc.size)
    return {"images": torch.stack(images), "screen_boxes": screen_boxes,
            "screen_sizes": np.asarray(screen_sizes, dtype=np.float64), "screen": torch.tensor(screen),
            "tokens": tokenize(texts), "boxes": np.asarray(boxes, dtype=np.float64), "sizes": np.asarray(sizes, dtype=np.float64), "kinds": kinds}


def train_grounding(config: dict) -> dict[str, torch.Tensor]:
    """Cross-entropy to a uniform target over the target element's cells; AdamW, one-cycle schedule."""
    with one_thread():
        return _train(config)


def _train(config: dict) -> dict[str, torch.Tensor]:
    torch.manual_seed(config["seed"])
    seeds = np.arange(config["screens"]) + config["seed"] * 1_000_003
    data = synthetic_batch(seeds, config["per_screen"], config["seed"])
    model = GroundingNet(config["width"])
    n = len(data["tokens"])

    def loss(g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(n, (config["batch"],), generator=g)
        img = data["images"][data["screen"][idx]].float() / 255.0
        logits = model(img, data["tokens"][idx]).flatten(1)
        target = cell_targets(data["boxes"][idx.numpy()], data["sizes"][idx.numpy()]).flatten(1)
        return -(target * torch.log_softmax(logits, 1)).sum(1).mean()

    return _fit(model, config, loss, "training gui grounding model")


def train_element_boxes(config: dict) -> dict[str, torch.Tensor]:
    """The box network: on every cell inside an element of the screen, an L1 loss on the log of the distances
    to the element's four edges (cells outside every element are not scored); AdamW, one-cycle schedule."""
    with one_thread():
        torch.manual_seed(config["seed"])
        seeds = np.arange(config["screens"]) + config["seed"] * 1_000_003
        data = synthetic_batch(seeds, 1, config["seed"])
        extents, inside = element_extents(data["screen_boxes"], data["screen_sizes"])
        log_extents = extents.clamp_min(0.05).log()
        model = ElementBoxNet(config["width"])

        def loss(g: torch.Generator) -> torch.Tensor:
            idx = torch.randint(len(data["images"]), (config["batch"],), generator=g)
            ext = model(data["images"][idx].float() / 255.0)
            m = inside[idx][:, None].expand_as(ext)
            return (ext.clamp_min(1e-3).log() - log_extents[idx]).abs()[m].mean()

        return _fit(model, config, loss, "training gui element-box model")


def _fit(model: torch.nn.Module, config: dict, loss: Callable[[torch.Generator], torch.Tensor],
         label: str) -> dict[str, torch.Tensor]:
    """``config["steps"]`` AdamW steps on ``loss(generator)`` (the generator draws the batches) with a one-cycle
    schedule peaking at ``config["lr"]``."""
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config["lr"], total_steps=config["steps"], pct_start=0.1)
    g = torch.Generator().manual_seed(config["seed"])
    with progress_bar(config["steps"], label) as advance:
        for _ in range(config["steps"]):
            value = loss(g)
            opt.zero_grad()
            value.backward()
            opt.step()
            sched.step()
            advance(1, loss=value.item())
    return model.state_dict()
