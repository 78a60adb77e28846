"""What the search tasks' reference models share: their training loops and their cached weights.

Every loop is seeded and draws its batches from its own generator, so the same
config trains the same weights bit for bit: the helpers here draw their random
numbers in a fixed order (documented on each) that the cached models depend on.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import MmttsError
from ..core.progress import progress_bar


def cached_model(cache, model: nn.Module, name: str, config: dict,
                 train: Callable[[], dict[str, torch.Tensor]]) -> nn.Module:
    """``model`` in eval mode with the weights that ``cache`` (a :class:`ModelCache`) keeps as ``name`` for
    ``config``; ``train()`` makes them first when they are missing."""
    model.load_state_dict(cache.load_or_train(name, config, train))
    return model.eval()


def seeded_model(make_model: Callable[[], nn.Module], seed: int) -> tuple[nn.Module, torch.Generator]:
    """``make_model()`` built after seeding torch with ``seed`` (its initial weights), and a generator seeded with
    ``seed`` for the training batches."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    return make_model(), g


def adamw_one_cycle(model: nn.Module, lr: float, steps: int):
    """AdamW without weight decay on ``model``'s parameters, under a one-cycle schedule of ``steps`` steps that
    peaks at ``lr`` after 5% of them. Returns ``(optimizer, schedule)``."""
    if steps <= 20:  # the warm-up must last at least one step
        raise MmttsError(f"a one-cycle schedule of {steps} steps has no warm-up step (5% of them); give the "
                         "training config more than 20 steps")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)


def optimizer_step(loss: torch.Tensor, model: nn.Module, opt: torch.optim.Optimizer, sched=None,
                   clip: float | None = None) -> None:
    """Zero the gradients, backpropagate ``loss``, clip ``model``'s gradient norm to ``clip`` (not at all when
    None), step ``opt`` and then the learning-rate schedule ``sched`` (when given)."""
    opt.zero_grad()
    loss.backward()
    if clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    if sched is not None:
        sched.step()


def fit(model: nn.Module, opt: torch.optim.Optimizer, sched, steps: int, loss_at: Callable[[int], torch.Tensor],
        description: str, every: int, clip: float | None = None) -> None:
    """``steps`` optimizer steps of ``model``: step ``i`` takes the loss ``loss_at(i)`` (which draws its own
    batch) through :func:`optimizer_step`; a progress bar named ``description`` advances every ``every`` steps,
    showing the last loss."""
    with progress_bar(steps, description) as advance:
        for i in range(steps):
            loss = loss_at(i)
            optimizer_step(loss, model, opt, sched, clip)
            if i % every == every - 1:
                advance(every, loss=loss.item())


def forward_diffusion(x0: torch.Tensor, alphas_cumprod: torch.Tensor,
                      g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The epsilon-prediction training pair of a clean batch ``x0``: timesteps ``t`` uniform over the schedule,
    noise ``eps`` and ``xt = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, drawn from ``g`` in that order.

    Returns ``(t, eps, xt)``.
    """
    t = torch.randint(0, len(alphas_cumprod), (len(x0),), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = alphas_cumprod[t].reshape(-1, *[1] * (x0.dim() - 1))
    return t, eps, a.sqrt() * x0 + (1 - a).sqrt() * eps


def fit_noisy_classifier(make_model: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, epochs: int,
                         seed: int, description: str, noise: float = 0.05, batch: int = 64,
                         lr: float = 2e-3) -> dict[str, torch.Tensor]:
    """Train the classifier ``make_model()`` (built after seeding torch with ``seed``) with Adam on ``(x, y)``
    for ``epochs`` epochs of shuffled batches, each input with Gaussian noise of std ``noise`` added (a
    verifier then also copes with slightly noisy samples); the shuffles and noise come from a generator seeded
    with ``seed``. Returns the state dict, in eval mode."""
    model, g = seeded_model(make_model, seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with progress_bar(epochs, description) as advance:
        for _ in range(epochs):
            model.train()
            for idx in torch.randperm(len(x), generator=g).split(batch):
                xb = x[idx] + noise * torch.randn(x[idx].shape, generator=g)
                loss = F.cross_entropy(model(xb), y[idx])
                optimizer_step(loss, model, opt)
            advance(1, loss=loss.item())
    return model.eval().state_dict()
