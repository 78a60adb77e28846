"""Importance weights and resampling schemes for population strategies."""

from __future__ import annotations

import warnings

import numpy as np
import torch

SCHEMES = ("multinomial", "systematic")


def normalize_log_weights(log_w: torch.Tensor) -> torch.Tensor:
    """Normalised weights from log-weights; all -inf (every candidate ranked last) gives uniform weights."""
    log_w = torch.as_tensor(log_w, dtype=torch.float64)
    if torch.isnan(log_w).any():
        raise ValueError("log-weights contain NaN; scores must be validated before weighting")
    if not torch.isfinite(log_w.max()):
        if log_w.max() == float("inf"):
            raise ValueError("a log-weight is +inf; a potential must be finite or -inf")
        warnings.warn("every candidate has zero weight; resampling uniformly", RuntimeWarning, stacklevel=2)
        return torch.full_like(log_w, 1.0 / log_w.numel())
    w = torch.exp(log_w - log_w.max())
    return w / w.sum()


def effective_sample_size(log_w: torch.Tensor) -> float:
    """ESS = 1 / sum(w_i^2) of the normalised weights: n for equal weights, 1 for a single survivor."""
    w = normalize_log_weights(log_w)
    return float(1.0 / (w * w).sum())


def resample(log_w: torch.Tensor, n: int, scheme: str, rng: np.random.Generator) -> torch.Tensor:
    """Draw ``n`` ancestor indices in proportion to the weights.

    ``multinomial`` draws independently; ``systematic`` uses one uniform offset
    and n evenly spaced points, which has lower variance and keeps every
    candidate whose weight is at least 1/n.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown resampling scheme {scheme!r}; choose one of {SCHEMES}")
    w = normalize_log_weights(log_w).numpy()
    if scheme == "multinomial":
        idx = rng.choice(len(w), size=n, replace=True, p=w)
    else:
        positions = (rng.random() + np.arange(n)) / n
        cdf = np.cumsum(w)
        cdf[-1] = 1.0
        idx = np.searchsorted(cdf, positions, side="right")
    return torch.as_tensor(np.sort(idx), dtype=torch.int64)


# -- copies that must diverge ---------------------------------------------------------------
FORKS = ("noise", "perturb")


def fork_points(process, points: list[int], fork: str, strategy: str) -> list[int]:
    """The planned selection stages at which copying candidates still makes sense.

    With ``fork="noise"`` copies rely on the process's own fresh noise, so a
    stage after which the process declares every step deterministic
    (:meth:`~mmtts.core.process.Process.forks_diverge` is False) is dropped:
    its copies could never differ. When that drops every planned stage the
    strategy cannot search at all, and this refuses, naming the fix. With
    ``fork="perturb"`` copies are mutated instead (:func:`fork_copies`) and
    every stage stays.
    """
    from ..core.errors import MmttsError
    from ..core.process import Process
    name = type(process).__name__
    if fork == "perturb":
        if type(process).perturb is Process.perturb:
            raise MmttsError(f"{strategy} with fork='perturb' mutates copies with {name}.perturb(), which {name} "
                             "does not implement; use fork='noise' with a stochastic schedule")
        return list(points)
    kept = [t for t in points if process.forks_diverge(t) is not False]
    if points and not kept:
        raise MmttsError(
            f"{strategy} selects and copies candidates at stages {points[:8]}{' ...' if len(points) > 8 else ''}, "
            f"but {name} draws no fresh noise from stage {points[0]} on, so every copy would stay equal to its "
            "parent and the search would be worse than best-of-n; use a stochastic schedule (eta > 0, e.g. "
            "eta=1.0) or pass fork='perturb' to mutate the copies"
        )
    return kept


def fork_copies(ctx, state, index: torch.Tensor, fork: str):
    """``state.resample(index)`` where, with ``fork="perturb"``, every copy but the first of each
    candidate is mutated by ``ctx.perturb(copies, 1.0)`` (the stage's own noise scale, on the search's model clock).

    ``index`` holds each candidate's copies next to each other (as sorted
    resampling indices and repeated beams do). Returns None when the
    perturbation leaves every copy unchanged (a stage whose noise scale is 0,
    such as a sampler's last step): such a selection would only duplicate.
    """
    from ..core.state import State
    kids = state.resample(index)
    if fork != "perturb":
        return kids
    index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
    first = torch.ones(len(index), dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]
    copies = torch.nonzero(~first).reshape(-1)
    if len(copies) == 0:
        return kids
    plain = kids.select(copies)
    moved = ctx.perturb(plain, 1.0)
    if torch.equal(ctx.process.latent(moved), ctx.process.latent(plain)):
        return None
    firsts = torch.nonzero(first).reshape(-1)
    order = torch.cat([firsts, copies])
    return State.cat([kids.select(firsts), moved]).select(torch.argsort(order))


def count_distinct(outputs) -> int:
    """The number of different candidates in an output batch (equal content counts once)."""
    from ..core.batch import batch_size, take
    from ..core.verifier import content_key
    if isinstance(outputs, torch.Tensor):
        flat = outputs.detach().reshape(len(outputs), -1)
        return int(torch.unique(flat.cpu(), dim=0).shape[0]) if len(flat) else 0
    return len({content_key(take(outputs, [i])) for i in range(batch_size(outputs))})


def warn_if_collapsed(outputs, strategy: str, process, fork: str) -> int:
    """Count the distinct outputs of a population that should have none equal; warn when some are."""
    from ..core.batch import batch_size
    from ..core.errors import CollapseWarning
    n, d = batch_size(outputs), count_distinct(outputs)
    if d < n:
        fix = ("use a stochastic schedule (eta > 0), pass fork='perturb', or declare the process's "
               "is_stochastic() so the strategy skips selections whose copies cannot diverge") if fork == "noise" \
            else "select at stages where the process's perturb() adds noise, or use a stochastic schedule"
        warnings.warn(f"{strategy} ended with {d} distinct outputs among {n} candidates: copies of a selected "
                      f"candidate stayed equal under {type(process).__name__}; {fix}", CollapseWarning, stacklevel=3)
    return d
