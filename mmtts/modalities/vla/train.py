"""Training an action verifier from demonstrations alone, by RoboMonkey's synthetic recipe.

No one labels which of two robot actions is better, but a demonstration says
which action was taken. Perturbing each demonstrated action at a range of
scales gives candidates whose error to it (RMSE) is known; any two
candidates of the same observation make a preference pair, winner the one
nearer the demonstration. The loss is Bradley-Terry with a margin:

    loss = -log sigmoid(r(s, a_w) - r(s, a_l) - alpha * (e_l - e_w))

so the verifier must separate a pair by at least ``alpha`` times their gap
in error, not merely order it: it learns how much better, which is what lets
it rank K close candidates at test time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...core.errors import MmttsError
from ...core.progress import progress_bar
from .space import ActionSpace


def bradley_terry_margin_loss(score_win: torch.Tensor, score_lose: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(score_win - score_lose - margin) (softplus form, stable for large gaps)."""
    return F.softplus(-(score_win - score_lose - margin)).mean()


@dataclass
class PreferencePairs:
    """Pairs of perturbed demonstration actions, the better one first.

    Attributes:
        index: (P,) the demonstration each pair perturbs.
        win: (P, H, D) the candidate nearer the demonstrated action.
        lose: (P, H, D) the other candidate.
        gap: (P,) RMSE(lose) - RMSE(win) >= 0.
    """

    index: torch.Tensor  # (P,) the demonstration each pair perturbs
    win: torch.Tensor  # (P, H, D) the candidate nearer the demonstrated action
    lose: torch.Tensor  # (P, H, D)
    gap: torch.Tensor  # (P,) RMSE(lose) - RMSE(win) >= 0


def synthetic_pairs(actions: torch.Tensor, num_pairs: int, generator: torch.Generator, space: ActionSpace | None = None,
                    min_scale: float = 0.02, max_scale: float = 1.0) -> PreferencePairs:
    """``num_pairs`` preference pairs around demonstrated ``actions`` (M, H, D).

    Each candidate is the demonstration plus Gaussian noise whose scale is
    log-uniform in [min_scale, max_scale] (relative to the action range
    when ``space`` is given), clipped to the bounds, so pairs cover both
    coarse and fine distinctions.
    """
    if actions.ndim != 3:
        raise MmttsError(f"demonstrated actions must be (M, horizon, D); got {tuple(actions.shape)}")
    if not 0 < min_scale <= max_scale:
        raise MmttsError(f"perturbation scales need 0 < min_scale <= max_scale; got {min_scale}, {max_scale}")
    m = actions.shape[0]
    idx = torch.randint(0, m, (num_pairs,), generator=generator)
    target = actions[idx].to(torch.float32)
    unit = torch.ones(actions.shape[-1])
    if space is not None:
        lo, hi = space.bounds(target)
        unit = (hi - lo) / 2
    logs = torch.empty(num_pairs, 2).uniform_(torch.log(torch.tensor(min_scale)).item(),
                                              torch.log(torch.tensor(max_scale)).item(), generator=generator)
    scale = logs.exp()[:, :, None, None] * unit
    cand = target[:, None] + scale * torch.randn((num_pairs, 2, *target.shape[1:]), generator=generator)
    if space is not None:
        cand = space.clip(cand)
    err = ((cand - target[:, None]) ** 2).flatten(2).mean(2).sqrt()  # (P, 2)
    w = err.argmin(1)
    ar = torch.arange(num_pairs)
    return PreferencePairs(idx, cand[ar, w], cand[ar, 1 - w], (err[ar, 1 - w] - err[ar, w]))


def train_action_verifier(scorer: torch.nn.Module, observations: dict, actions: torch.Tensor, *, steps: int,
                          batch_size: int = 256, lr: float = 1e-3, alpha: float = 1.0, seed: int = 0,
                          space: ActionSpace | None = None, min_scale: float = 0.02, max_scale: float = 1.0,
                          description: str = "training action verifier") -> list[float]:
    """Fit ``scorer(observations, actions)`` on fresh synthetic pairs each step; returns the loss per step.

    ``observations`` is a LeRobot-shaped batch with one row per demonstrated
    action (M, H, D).
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(scorer.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    scorer.train()
    with progress_bar(steps, description) as advance:
        for i in range(steps):
            pairs = synthetic_pairs(actions, batch_size, g, space, min_scale, max_scale)
            obs = {k: v[pairs.index] if isinstance(v, torch.Tensor) else [v[j] for j in pairs.index.tolist()]
                   for k, v in observations.items()}
            loss = bradley_terry_margin_loss(scorer(obs, pairs.win), scorer(obs, pairs.lose), alpha * pairs.gap)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if i % 50 == 49 or i == steps - 1:
                advance(50 if i % 50 == 49 else (i % 50) + 1, loss=losses[-1])
    scorer.eval()
    return losses
