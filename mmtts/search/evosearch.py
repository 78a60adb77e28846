"""EvoSearch: evolve a population of trajectories, mutating the initial noise and later latents."""

from __future__ import annotations

import numpy as np
import torch

from ..core.batch import concat, take
from ..core.errors import BudgetError
from ..core.registry import STRATEGIES
from ..core.state import State
from ..core.strategy import SearchContext, Selection, Strategy
from .best_of_n import top_k


def default_evolution_stages(T: int, generations: int) -> list[int]:
    """Stage at which each generation after the first evolves: from the initial noise to halfway.

    Early generations explore the noise; later ones refine a trajectory from a
    partly denoised latent, which is also cheaper (fewer stages left to run).
    """
    later = generations - 1
    if later <= 1:
        return [0] * later
    return [int(round((T // 2) * g / (later - 1))) for g in range(later)]


@STRATEGIES.register("evosearch")
class EvoSearch(Strategy):
    """Evolutionary search over denoising trajectories.

    Generation 0 runs ``population`` fresh candidates to the end. Each later
    generation g evolves at stage e_g: the ``elites`` best of the archive (every
    candidate evaluated so far) survive unchanged and unpaid-for, and the rest of
    the population are children: a parent is the best of ``tournament``
    members drawn from the top ``archive_fraction`` of the archive, its latent
    at stage e_g is mutated *before* step e_g is taken (at e_g = 0:
    sqrt(1 - b^2) x + b eps with b = ``noise_beta``, which keeps the noise
    standard normal; later: x + ``latent_scale`` * sigma_t * eps with sigma_t the
    sampler's stochastic std at that step), and the child runs to the end and is
    scored. Children get fresh forked streams. The number of generations is as
    many as the budget pays for, unless ``generations`` is given.

    One generation with no mutation is best-of-N over ``population`` candidates.
    """

    def __init__(self, population: int = 8, elites: int | None = None, tournament: int = 2,
                 archive_fraction: float = 0.9, noise_beta: float = 0.2, latent_scale: float = 1.0,
                 generations: int | None = None, stages: list[int] | None = None, keep: int = 1):
        if population < 1 or tournament < 1 or keep < 1:
            raise ValueError(f"evosearch needs population, tournament and keep >= 1; got "
                             f"{population}, {tournament}, {keep}")
        elites = max(1, population // 4) if elites is None else elites
        if not 0 <= elites < population and population > 1:
            raise ValueError(f"elites={elites} must be in [0, population={population})")
        if not 0 < archive_fraction <= 1:
            raise ValueError(f"archive_fraction={archive_fraction} must be in (0, 1]")
        if not 0 <= noise_beta <= 1:
            raise ValueError(f"noise_beta={noise_beta} must be in [0, 1]")
        if generations is not None and generations < 1:
            raise ValueError(f"generations={generations} must be at least 1")
        super().__init__(population=population, elites=elites, tournament=tournament,
                         archive_fraction=archive_fraction, noise_beta=noise_beta, latent_scale=latent_scale,
                         generations=generations, stages=stages, keep=keep)
        self.P, self.elites, self.tournament, self.frac = population, elites, tournament, archive_fraction
        self.beta, self.latent_scale, self.generations, self.stages, self.keep = (
            noise_beta, latent_scale, generations, stages, keep)

    # -- schedule --------------------------------------------------------------------
    def plan(self, ctx: SearchContext) -> tuple[int, list[int]]:
        p = ctx.process
        T = p.num_stages
        b = ctx.budget
        cost = lambda e, k: k * int(p.stage_nfe(torch.arange(e, T)).sum())  # noqa: E731
        P = self.P
        if b.remaining_nfe < cost(0, P) or b.remaining_verifier_calls < P:
            cap = ctx.candidates_affordable()
            if self.generations not in (None, 1) or cap < 1:
                b.require_candidates(P, p.nfe_per_candidate())
            P = cap  # the budget pays for less than one population: best-of-N over what it affords
        kids = P - min(self.elites, P - 1) if P > 1 else 1

        def total(stages):
            return cost(0, P) + sum(cost(e, kids) for e in stages), P + kids * len(stages)

        def fits(stages):
            nfe, calls = total(stages)
            return nfe <= b.remaining_nfe and calls <= b.remaining_verifier_calls

        def schedule(g):
            st = list(self.stages[: g - 1]) if self.stages is not None else default_evolution_stages(T, g)
            if any(not 0 <= e < T for e in st) or st != sorted(st):
                raise ValueError(f"evolution stages {st} must be non-decreasing and lie in [0, {T})")
            return st

        if self.generations is not None:
            chosen = schedule(self.generations)
            if len(chosen) < self.generations - 1 or not fits(chosen):
                raise BudgetError(f"{self.generations} generation(s) of {P} cost {total(chosen)[0]} NFE and "
                                  f"{total(chosen)[1]} verifier calls; the budget has {b.remaining_nfe} NFE and "
                                  f"{b.remaining_verifier_calls} calls")
        else:
            limit = (len(self.stages) + 1) if self.stages is not None else 1000
            g = 1
            while g < limit and fits(schedule(g + 1)):
                g += 1
            chosen = schedule(g)
        return P, chosen

    # -- running ------------------------------------------------------------------------
    def _evaluate(self, ctx: SearchContext, state: State, snapshot_at: list[int]):
        """Run candidates to the end, keeping copies of their states at the given stages."""
        snaps = {}
        for e in snapshot_at:
            if int(state.stage[0]) == e:
                snaps[e] = state
        while not bool(ctx.process.is_done(state).all()):
            state = ctx.step(state)
            s = int(state.stage[0])
            if s in snapshot_at:
                snaps[s] = state
        out = ctx.finish(state)
        return out, ctx.score(out, state), state, snaps

    def run(self, ctx: SearchContext) -> Selection:
        loop = ctx.restored
        if loop is None:
            P, stages = self.plan(ctx)
            out, s, final, snaps = self._evaluate(ctx, ctx.fresh(P), stages)
            loop = {"P": P, "stages": stages, "gen": 0,
                    "archive": {"outputs": out, "scores": s, "final": final,
                                "snaps": {str(e): snaps[e] for e in stages}}}
            ctx.checkpoint(loop)
        P, stages, arch = loop["P"], loop["stages"], loop["archive"]
        while loop["gen"] < len(stages):
            e = stages[loop["gen"]]
            scores = arch["scores"]
            parents = self._tournament(ctx, scores, P - min(self.elites, P - 1) if P > 1 else 1)
            snap = arch["snaps"][str(e)]
            kids = snap.resample(parents, fork_all=True)
            scale = self.beta if e == 0 else self.latent_scale
            kids = ctx.process.perturb(kids, scale)
            later = sorted(set(stages[loop["gen"] + 1:]))
            out, s, final, snaps = self._evaluate(ctx, kids, later)
            arch = self._grow(arch, out, s, final, snaps, later)
            loop.update(gen=loop["gen"] + 1, archive=arch)
            ctx.checkpoint(loop)
        order = top_k(arch["scores"], self.keep)
        return Selection(outputs=take(arch["outputs"], order), scores=arch["scores"][order],
                         state=arch["final"].select(order),
                         extra={"population": P, "generations": len(stages) + 1, "stages": stages,
                                "archive": len(arch["scores"])})

    def _tournament(self, ctx: SearchContext, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Parents: each the best of ``tournament`` random members of the archive's top fraction."""
        ranked = top_k(scores, len(scores))
        pool = ranked[: max(1, int(np.ceil(self.frac * len(scores))))]
        rng = ctx.rng.numpy()
        draws = rng.integers(0, len(pool), size=(k, self.tournament))
        best_pos = draws.min(axis=1)  # pool is sorted best first, so the smallest position wins
        return pool[torch.as_tensor(best_pos)]

    @staticmethod
    def _grow(arch: dict, out, s, final: State, snaps: dict, later: list[int]) -> dict:
        """Append a generation to the archive, with snapshots at the stages later generations evolve at."""
        merged = {str(e): State.cat([arch["snaps"][str(e)], snaps[e]]) for e in later}
        return {"outputs": concat([arch["outputs"], out]), "scores": torch.cat([arch["scores"], s]),
                "final": State.cat([arch["final"], final]), "snaps": merged}
