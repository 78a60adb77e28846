"""Zero-order search over the initial noise: move a pivot to better neighbours on a sphere around it."""

from __future__ import annotations

import math

import torch

from ..core.errors import BudgetError
from ..core.registry import STRATEGIES
from ..core.strategy import SearchContext, Selection, Strategy
from .best_of_n import merge_top, top_k


def sphere_neighbours(pivot: torch.Tensor, directions: torch.Tensor, radius: float) -> torch.Tensor:
    """pivot + radius * sqrt(d) * u with u the normalised ``directions``: points at distance radius*sqrt(d).

    Scaling by sqrt(d) makes ``radius`` relative to the typical norm of a
    d-dimensional standard normal noise, so one setting fits any latent size.
    """
    d = pivot[0].numel()
    flat = directions.reshape(len(directions), -1).to(torch.float64)
    u = flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return (pivot.reshape(1, -1).to(torch.float64) + radius * math.sqrt(d) * u).reshape(directions.shape).to(
        pivot.dtype)


@STRATEGIES.register("zero-order")
class ZeroOrder(Strategy):
    """Evaluate a random pivot noise, then ``neighbours`` points on the sphere around it per iteration.

    The best neighbour becomes the pivot when it beats the pivot's score;
    otherwise the pivot stays and a fresh neighbourhood is drawn. Each
    neighbour's direction is its own stream's first draw, and it keeps that
    stream for the rest of its trajectory. Iterations are sized from the budget
    (1 + neighbours * iterations candidates, the last iteration possibly smaller).
    """

    def __init__(self, neighbours: int = 8, radius: float = 0.2, keep: int = 1):
        if neighbours < 1 or keep < 1 or radius <= 0:
            raise ValueError(f"zero-order needs neighbours >= 1, radius > 0 and keep >= 1; got "
                             f"{neighbours}, {radius}, {keep}")
        super().__init__(neighbours=neighbours, radius=radius, keep=keep)
        self.neighbours, self.radius, self.keep = neighbours, radius, keep

    def run(self, ctx: SearchContext) -> Selection:
        loop = ctx.restored
        if loop is None:
            cap = ctx.candidates_affordable()
            if cap == -1:
                raise BudgetError("zero-order needs an NFE or verifier-call cap to size its iterations")
            ctx.budget.require_candidates(1, ctx.process.nfe_per_candidate())
            pivot = ctx.fresh(1)
            final = ctx.advance(pivot)
            out = ctx.finish(final)
            score = ctx.score(out, final)
            loop = {"left": cap - 1, "pivot": pivot, "pivot_score": float(score[0]), "moves": 0,
                    "best": {"outputs": out, "scores": score, "state": final.select([0])}}
            ctx.checkpoint(loop)
        while loop["left"] > 0:
            m = min(self.neighbours, loop["left"])
            cand = ctx.fresh(m)
            pivot_x = ctx.process.latent(loop["pivot"])
            start = ctx.process.with_latent(cand, sphere_neighbours(pivot_x, ctx.process.latent(cand), self.radius))
            final = ctx.advance(start)
            out = ctx.finish(final)
            s = ctx.score(out, final)
            j = int(top_k(s, 1)[0])
            if float(s[j]) > loop["pivot_score"]:
                loop["pivot"], loop["pivot_score"] = start.select([j]), float(s[j])
                loop["moves"] += 1
            loop["best"] = merge_top(loop["best"], out, s, final, self.keep)
            loop["left"] -= m
            ctx.checkpoint(loop)
        best = loop["best"]
        return Selection(outputs=best["outputs"], scores=best["scores"], state=best["state"],
                         extra={"moves": loop["moves"]})
