"""Zero-order search over the initial noise: move a pivot to better neighbours on a sphere around it."""

from __future__ import annotations

import math

import torch

from ..core.registry import STRATEGIES
from ..core.settings import flag, real, whole
from ..core.strategy import SearchContext, Selection, Strategy, merge_top, top_k


def sphere_neighbours(pivot: torch.Tensor, directions: torch.Tensor, radius: float) -> torch.Tensor:
    """Points at distance rho = radius * sqrt(d) from the pivot that keep the pivot's norm.

    Each point lies on the sphere of radius rho around the pivot *and* on the
    pivot's own norm shell: y = (1 - rho^2 / (2 |x|^2)) x + rho sqrt(1 - rho^2 / (4 |x|^2)) w, with w
    the unit direction of ``directions`` orthogonal to x. A plain x + rho u would
    lengthen the noise by sqrt(1 + rho^2 / |x|^2) at every move, walking the pivot off
    the shell where a standard normal noise lives. Scaling by sqrt(d) makes
    ``radius`` relative to the typical norm of a d-dimensional standard normal, so
    one setting fits any latent size; rho is capped at the shell's diameter 2 |x|.
    """
    d = pivot[0].numel()
    x = pivot.reshape(1, -1).to(torch.float64)
    xn = x.norm().clamp(min=1e-12)
    u = x / xn
    v = directions.reshape(len(directions), -1).to(torch.float64)
    w = v - (v @ u.T) * u
    w = w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)
    rho = min(radius * math.sqrt(d), 2 * float(xn))
    out = (1 - rho ** 2 / (2 * xn ** 2)) * x + rho * (1 - rho ** 2 / (4 * xn ** 2)).clamp(min=0).sqrt() * w
    return out.reshape(directions.shape).to(pivot.dtype)


@STRATEGIES.register("zero-order")
class ZeroOrder(Strategy):
    """Evaluate a random pivot noise, then ``neighbours`` points on the sphere around it per iteration.

    The best neighbour becomes the pivot when it beats the pivot's score. When
    none does, the pivot is resampled (``restart``): the next iteration draws
    ``neighbours`` fresh random noises and the best of them becomes the pivot,
    so a pivot stuck in a poor basin (a wrong digit, say) is left rather than
    circled; with ``restart=False`` the pivot stays and a fresh neighbourhood
    is drawn around it. The best candidate ever seen is returned. Each
    neighbour's direction is its own stream's first draw, and it keeps that
    stream for the rest of its trajectory. Iterations are sized from the budget
    (1 + neighbours * iterations candidates, the last iteration possibly smaller);
    under a time-only budget they run until the deadline.

    Args:
        neighbours: candidates per iteration.
        radius: the neighbourhood's radius, relative to the typical norm of the noise.
        restart: draw fresh noises when no neighbour improves on the pivot.
        keep: how many of the best finished candidates to return.
    """

    def __init__(self, neighbours: int = 8, radius: float = 0.2, restart: bool = True, keep: int = 1):
        neighbours, keep = whole("neighbours", neighbours, "zero-order"), whole("keep", keep, "zero-order")
        radius = real("radius", radius, "zero-order", 0.0, low_open=True)
        restart = flag("restart", restart, "zero-order")
        super().__init__(neighbours=neighbours, radius=radius, restart=restart, keep=keep)
        self.neighbours, self.radius, self.restart, self.keep = neighbours, radius, bool(restart), keep

    def run(self, ctx: SearchContext) -> Selection:
        loop = ctx.restored
        if loop is None:
            cap = ctx.candidates_affordable()
            ctx.require_candidates(1)
            pivot = ctx.fresh(1)
            final = ctx.advance(pivot)
            out = ctx.finish(final)
            score = ctx.score(out, final)
            left = cap - 1 if cap != -1 else math.inf  # a time-only budget: until the deadline
            loop = {"left": left, "pivot": pivot, "pivot_score": float(score[0]), "moves": 0,
                    "restart": False, "restarts": 0,
                    "best": {"outputs": out, "scores": score, "state": final.select([0])}}
            ctx.checkpoint(loop)
        while loop["left"] > 0:
            m = min(self.neighbours, loop["left"])
            cand = ctx.fresh(m)
            if loop["restart"]:  # no neighbour improved last time: fresh random noises, the best the new pivot
                start = cand
                loop["restarts"] += 1
            else:
                pivot_x = ctx.process.latent(loop["pivot"])
                start = ctx.process.with_latent(cand, sphere_neighbours(pivot_x, ctx.process.latent(cand),
                                                                        self.radius))
            final = ctx.advance(start)
            out = ctx.finish(final)
            s = ctx.score(out, final)
            j = int(top_k(s, 1)[0])
            if loop["restart"] or float(s[j]) > loop["pivot_score"]:
                loop["moves"] += not loop["restart"]
                loop["pivot"], loop["pivot_score"], loop["restart"] = start.select([j]), float(s[j]), False
            else:
                loop["restart"] = self.restart
            loop["best"] = merge_top(loop["best"], out, s, final, self.keep)
            loop["left"] -= m
            ctx.checkpoint(loop)
        best = loop["best"]
        return Selection(outputs=best["outputs"], scores=best["scores"], state=best["state"],
                         extra={"moves": loop["moves"], "restarts": loop["restarts"]})
