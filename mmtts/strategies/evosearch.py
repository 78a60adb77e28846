"""EvoSearch: evolve a population of trajectories, mutating the initial noise and later latents."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch

from ..core.batch import concat, take
from ..core.errors import BudgetError, SettingsError
from ..core.registry import STRATEGIES
from ..core.settings import flag, real, renamed, whole
from ..core.rng import StrategyRNG
from ..core.state import State
from ..core.strategy import SearchContext, Selection, Strategy, top_k


def default_evolution_stages(T: int) -> list[int]:
    """Every stage after the first: the trajectory is refined wherever an x0-hat can be scored."""
    return list(range(1, T))


@STRATEGIES.register("evosearch")
class EvoSearch(Strategy):
    """Evolutionary search over the initial noise, then along the denoising trajectory.

    **Noise generations.** Generation 0 runs ``initial`` fresh noises to the end
    and scores them (best-of-``initial``). Each further noise generation breeds
    ``n - elites`` children: a parent is the best of ``tournament``
    members drawn from the top ``archive_fraction`` of the archive (every
    candidate finished so far; the archive's best, the elites, survive in it
    unchanged and are not paid for again), its noise is mutated as
    sqrt(1 - b^2) x + b eps with b = ``noise_beta`` (still standard normal), and
    the child runs to the end and is scored.

    **Trajectory generations** at the evolution ``stages`` e_1 < e_2 < ...:
    the population at e_1 is ``n`` children of tournament parents from
    the archive, taken from the parents' latents saved at e_1 (no forwards
    repeated); at each later e_k it is the generation that reached e_k, scored by
    the verifier on its x0-hat preview, whose ``elites`` best go on unchanged
    and whose other places are children of tournament parents over the top
    ``archive_fraction`` of it. A child's latent is mutated *before* step e_k is
    taken, x + ``latent_scale`` * sigma_t * eps, with sigma_t the sampler's
    stochastic std at that step (the posterior std for a deterministic sampler).
    The last generation is run to the end and scored on its final outputs. A
    preview costs no forward, so the trajectory phase costs ``n``
    candidates from e_1 on; the noise generations are as many as the rest of the
    budget pays for, unless ``noise_generations`` is given. With
    ``noise_generations=0`` nothing is fully denoised before the trajectory
    phase: the ``initial`` fresh noises run to e_1 and are scored on their x0-hat
    there, and the first trajectory generation comes from them (elites included),
    so the whole budget goes to the trajectory. Scores at different stages are
    not comparable, so the trajectory phase's archive is the generation at hand;
    its elites carry the best forward.

    The answer is the best finished candidate ever seen. With no evolution stage
    and one noise generation (no mutation) this is best-of-``initial``. A
    population of one has no trajectory generations (nothing to select from);
    with ``noise_generations=0`` as well it is best-of-``initial``. Under a
    time-only budget (no NFE or verifier-call cap) and without
    ``noise_generations``, noise generations run until the deadline, with no
    trajectory phase.

    **Lineages.** A lineage is every candidate descended from one fresh noise
    (``State.origin``). Selection by score alone lets the best lineage take
    every place of the trajectory generations within a few of them, so the kept
    outputs are near copies of one image. With ``lineages`` = L > 1, a lineage
    holds at most ceil(k / L) of any k places filled by rank or tournament in
    the trajectory phase: of a generation's ``elites``, of its n places (elites
    included), and of the ``keep`` outputs returned. A tournament winner whose
    lineage is full gives its place to the member at the same rank among those
    whose lineage has room, so the draws and the selection pressure stay those
    of selection by score alone; places the cap cannot fill (fewer lineages
    than it needs) go by rank. A trajectory generation so holds at least
    n / ceil(n / L) lineages (L when L divides n) whenever the one before it
    did, and the kept outputs come from distinct lineages first. The noise
    generations are unchanged: their archive keeps every lineage it had. A
    generation's best candidate is always one of its elites, and the best
    finished candidate is always returned first. Selection by score alone is
    the published algorithm: ``lineages=1`` (or ``published=True``) runs it.

    Args:
        n: the population (candidates per generation); ``population`` is its deprecated name.
        initial: fresh candidates of generation 0 (default ``n``).
        elites: the best kept unchanged in each generation (default ``max(1, n // 4)``).
        tournament: members drawn per tournament; the best of them is a parent.
        archive_fraction: the top fraction of the archive (or generation) parents are drawn from.
        noise_beta: b of the initial-noise mutation sqrt(1 - b^2) x + b eps.
        latent_scale: the factor on sigma_t of the intermediate-latent mutation.
        noise_generations: generations over the initial noise (default: as many as the budget pays for).
        stages: the evolution stages e_1 < e_2 < ... (default: every stage after the first).
        keep: how many of the best finished candidates to return.
        lineages: L, the lineages the elites, each trajectory generation and the kept outputs are spread
            over (default ``keep``: one lineage per kept output; 1 selects by score alone).
        published: select as the published EvoSearch does, by score alone (``lineages=1``); the mutation
            of an intermediate latent still applies before its step.
    """

    def __init__(self, n: int | None = None, initial: int | None = None, elites: int | None = None,
                 tournament: int = 2, archive_fraction: float = 0.9, noise_beta: float = 0.2,
                 latent_scale: float = 1.0, noise_generations: int | None = None, stages: list[int] | None = None,
                 keep: int = 1, lineages: int | None = None, published: bool = False,
                 population: int | None = None):
        me = "evosearch"
        n = renamed(me, "n", n, 8, population=population)  # default 8
        n, tournament, keep = whole("n", n, me), whole("tournament", tournament, me), whole("keep", keep, me)
        initial = whole("initial", initial, me, none=True)
        elites = max(1, n // 4) if elites is None else whole("elites", elites, me, minimum=0)
        if not elites < n and n > 1:
            raise SettingsError(f"evosearch elites={elites} must be in [0, n={n})")
        archive_fraction = real("archive_fraction", archive_fraction, me, 0.0, 1.0, low_open=True)
        noise_beta = real("noise_beta", noise_beta, me, 0.0, 1.0)
        latent_scale = real("latent_scale", latent_scale, me, 0.0)
        noise_generations = whole("noise_generations", noise_generations, me, minimum=0, none=True)
        if stages is not None:
            if isinstance(stages, (str, bytes)) or not hasattr(stages, "__iter__"):
                raise SettingsError(f"evosearch stages={stages!r} must be a list of stage numbers")
            stages = [whole("stages", e, me, minimum=0) for e in stages]
            if stages != sorted(set(stages)) or any(e < 1 for e in stages):
                raise SettingsError(f"evolution stages {stages} must be strictly increasing and >= 1 (the initial "
                                    "noise evolves in the noise generations)")
        published = flag("published", published, me)
        lineages = whole("lineages", lineages, me, none=True)
        if published and lineages not in (None, 1):
            raise SettingsError(f"evosearch published=True selects by score alone, as the published algorithm; "
                                f"lineages={lineages} spreads selection over lineages: pass one of the two")
        lineages = 1 if published else keep if lineages is None else lineages
        super().__init__(n=n, initial=initial, elites=elites, tournament=tournament,
                         archive_fraction=archive_fraction, noise_beta=noise_beta, latent_scale=latent_scale,
                         noise_generations=noise_generations, stages=stages, keep=keep, lineages=lineages,
                         published=published)
        self.P, self.initial, self.elites, self.tournament, self.frac = (
            n, n if initial is None else initial, elites, tournament, archive_fraction)
        self.beta, self.latent_scale, self.noise_generations, self.stages, self.keep = (
            noise_beta, latent_scale, noise_generations, stages, keep)
        self.lineages = lineages
        self._drawn: dict = {}  # tournament draws made ahead, by (seed, counter, pool size, k, tournament)

    @property
    def kids(self) -> int:
        """Children per noise generation and per later trajectory generation."""
        return self.P - min(self.elites, self.P - 1) if self.P > 1 else 1

    # -- schedule --------------------------------------------------------------------
    def plan(self, ctx: SearchContext) -> dict:
        """Size the run from the budget: initial candidates, noise generations, evolution stages."""
        p, b = ctx.process, ctx.meter
        T = p.num_stages
        nfe = lambda lo, hi=T: int(p.stage_nfe(torch.arange(lo, hi)).sum())  # noqa: E731
        stages = list(self.stages) if self.stages is not None else default_evolution_stages(T)
        if any(e >= T for e in stages):
            raise SettingsError(f"evolution stages {stages} must lie in [1, {T})")
        n0, G = self.initial, self.noise_generations
        if not b.counted and G is None:  # a time-only budget: noise generations until the deadline
            if self.stages:
                raise BudgetError(f"trajectory generations at stages {stages} under a time-only budget need "
                                  "noise_generations= (otherwise the noise generations run until the deadline)")
            return {"initial": n0, "noise_generations": None, "stages": []}
        if self.P == 1:  # a trajectory generation of one has nothing to select: mutation would be a random walk
            if self.stages:
                raise SettingsError(f"trajectory generations at stages {stages} need n >= 2 to select "
                                 "from; use n >= 2 or no stages")
            stages = []
            if G == 0:  # nothing evolves: the initial candidates, finished and scored
                b.require_candidates(n0, p.nfe_per_candidate())
                return {"initial": n0, "noise_generations": 1, "stages": []}
        if G == 0:  # the initial candidates are scored on their x0-hat at the first evolution stage
            if not stages:
                raise SettingsError("noise_generations=0 needs at least one evolution stage")
            need = (n0 * nfe(0, stages[0]) + self.P * nfe(stages[0]), n0 + self.P * len(stages))
            if need[0] > b.remaining_nfe or need[1] > b.remaining_verifier_calls:
                raise BudgetError(f"{n0} initial candidates to stage {stages[0]} and a population of n={self.P} "
                                  f"from there cost {need[0]} NFE and {need[1]} verifier calls; the budget has "
                                  f"{b.remaining_nfe} NFE and {b.remaining_verifier_calls} calls")
            return {"initial": n0, "noise_generations": 0, "stages": stages}
        if b.remaining_nfe < n0 * nfe(0) or b.remaining_verifier_calls < n0:
            if G not in (None, 1) or self.stages:
                b.require_candidates(n0, p.nfe_per_candidate())
            n0 = ctx.candidates_affordable()  # less than one initial generation: best-of-N over what it affords
            if n0 < 1:
                b.require_candidates(1, p.nfe_per_candidate())
            return {"initial": n0, "noise_generations": 1, "stages": []}
        nfe_left, calls_left = b.remaining_nfe - n0 * nfe(0), b.remaining_verifier_calls - n0
        trajectory = (self.P * nfe(stages[0]), self.P * len(stages)) if stages else (0, 0)
        if trajectory[0] > nfe_left or trajectory[1] > calls_left:
            if self.stages is not None:
                raise BudgetError(f"the trajectory generations at stages {stages} cost {trajectory[0]} NFE and "
                                  f"{trajectory[1]} verifier calls after the initial {n0} candidates; the budget "
                                  f"leaves {nfe_left} NFE and {calls_left} calls")
            stages, trajectory = [], (0, 0)
        nfe_left, calls_left = nfe_left - trajectory[0], calls_left - trajectory[1]
        more = min(nfe_left / (self.kids * nfe(0)), calls_left / self.kids)
        affordable = 1 + int(more) if math.isfinite(more) else None  # None: only the deadline bounds them
        if G is None:
            G = affordable
        elif affordable is not None and G > affordable:
            raise BudgetError(f"{G} noise generation(s) ({n0} candidates, then {self.kids} children each) do not "
                              f"fit the budget with the trajectory generations; at most {affordable} do")
        return {"initial": n0, "noise_generations": G, "stages": stages}

    # -- running ------------------------------------------------------------------------
    def _finish(self, ctx: SearchContext, state: State, snapshot_at: int | None):
        """Run candidates to the end, keeping their states at ``snapshot_at``; score the outputs."""
        snap = state if snapshot_at is not None and int(state.stage[0]) == snapshot_at else None
        while not bool(ctx.process.is_done(state).all()):
            state = ctx.step(state)
            if int(state.stage[0]) == snapshot_at:
                snap = state
        out = ctx.finish(state)
        return out, ctx.score(out, state), state, snap

    def run(self, ctx: SearchContext) -> Selection:
        loop = ctx.restored
        if loop is None:
            plan = self.plan(ctx)
            first = plan["stages"][0] if plan["stages"] else None
            noise = ctx.fresh(plan["initial"])
            if plan["noise_generations"] == 0:
                pop = ctx.advance(noise, first)
                loop = {"plan": plan, "gen": 0, "k": 0, "population": pop, "archive": None,
                        "pop_scores": ctx.score(ctx.preview(pop), pop, final=False)}
            else:
                out, s, final, snap = self._finish(ctx, noise, first)
                loop = {"plan": plan, "gen": 1, "k": 0, "population": None, "pop_scores": None,
                        "archive": {"outputs": out, "scores": s, "final": final, "noise": noise, "snap": snap}}
            ctx.checkpoint(loop)
        plan, arch = loop["plan"], loop["archive"]
        stages = plan["stages"]
        first = stages[0] if stages else None
        while plan["noise_generations"] is None or loop["gen"] < plan["noise_generations"]:
            parents = self._parents(ctx, ranking(arch["scores"]), None, self.kids)
            kids = ctx.perturb(arch["noise"].resample(parents, fork_all=True), self.beta)
            out, s, final, snap = self._finish(ctx, kids, first)
            arch = self._grow(arch, out, s, final, kids, snap)
            loop.update(gen=loop["gen"] + 1, archive=arch)
            ctx.checkpoint(loop)
        while loop["k"] < len(stages):
            k = loop["k"]
            if loop["population"] is None:  # the elites are in the archive, finished: every place is a child
                snap = arch["snap"]
                parents = self._parents(ctx, ranking(arch["scores"]), self._places(snap, self.P), self.P)
                pop = ctx.perturb(snap.resample(parents, fork_all=True), self.latent_scale)
            else:
                pop = self._next_generation(ctx, loop["population"], loop["pop_scores"], ahead=len(stages) - k)
            nxt = stages[k + 1] if k + 1 < len(stages) else ctx.process.num_stages
            pop = ctx.advance(pop, nxt - stages[k])
            if k + 1 < len(stages):
                ps = ctx.score(ctx.preview(pop), pop, final=False)
                loop.update(k=k + 1, population=pop, pop_scores=ps)
            else:
                out = ctx.finish(pop)
                s = ctx.score(out, pop)
                arch = {"outputs": out, "scores": s, "final": pop} if arch is None else self._grow(arch, out, s, pop)
                loop.update(k=k + 1, population=None, pop_scores=None, archive=arch)
            ctx.checkpoint(loop)
        order = self._kept(arch["scores"], arch["final"])
        return Selection(outputs=take(arch["outputs"], order), scores=arch["scores"][order],
                         state=arch["final"].select(order),
                         extra={"n": self.P, "initial": plan["initial"],
                                "noise_generations": plan["noise_generations"], "stages": stages,
                                "generations": plan["noise_generations"] + len(stages),
                                "archive": len(arch["scores"]),
                                "kept_lineages": len(set(arch["final"].origin[order].tolist()))})

    # -- selection ------------------------------------------------------------------------
    def _share(self, places: int) -> int:
        """The most of ``places`` places filled by rank or tournament that one lineage may hold."""
        return -(-places // self.lineages)

    def _places(self, state: State, places: int) -> dict:
        """The lineage cap of ``places`` places over ``state``'s candidates: their lineages, the share each
        may hold, and how many places each holds so far (none)."""
        return {"origin": state.origin.tolist(), "share": self._share(places), "held": Counter()}

    @staticmethod
    def _fill(ranked: list[int], k: int, cap: dict, share: int) -> list[int]:
        """``k`` of ``ranked`` by rank, best first, counted into ``cap`` (the places of the whole batch).

        First no lineage past ``share`` of the ``k`` nor past its share of the
        batch; places left go to the best of the rest within the batch's share,
        then to the best of the rest.
        """
        origin, held, most = cap["origin"], cap["held"], cap["share"]
        own, out = Counter(), []
        for allowed in (lambda o: own[o] < share and held[o] < most, lambda o: held[o] < most, lambda o: True):
            for i in ranked:
                if len(out) == k:
                    break
                if i not in out and allowed(origin[i]):
                    out.append(i)
                    own[origin[i]] += 1
                    held[origin[i]] += 1
        position = {i: r for r, i in enumerate(ranked)}
        return sorted(out, key=position.__getitem__)

    def _kept(self, scores: torch.Tensor, final: State) -> list[int]:
        """The ``keep`` outputs returned, best first: the best of distinct lineages first (see ``lineages``)."""
        k = min(self.keep, len(scores))
        if self.lineages == 1:
            return top_k(scores, k).tolist()
        return self._fill(ranking(scores), k, self._places(final, k), self._share(k))

    def _next_generation(self, ctx: SearchContext, pop: State, scores: torch.Tensor, ahead: int) -> State:
        """The ``elites`` best of ``pop`` unchanged, then children of tournament parents over its top fraction,
        each lineage within its share of the places.

        The ranking and the tournament run over plain integers (a population is small); the result is
        ``State.cat([pop.select(elites), perturb(pop.resample(parents, fork_all=True))])``.
        """
        ranked = ranking(scores)
        e = min(self.elites, self.P - 1, len(ranked)) if self.P > 1 else 0
        if self.lineages == 1:
            elites, cap = ranked[:e], None
        else:
            cap = self._places(pop, self.P)
            elites = self._fill(ranked, e, cap, self._share(e))
        parents = self._parents(ctx, ranked, cap, self.P - e, ahead)
        kids = ctx.perturb(pop.resample(parents, fork_all=True), self.latent_scale)
        return State.cat([pop.select(elites), kids]) if e else kids

    def _parents(self, ctx: SearchContext, ranked: list[int], cap: dict | None, k: int, ahead: int = 1) -> list[int]:
        """``k`` parents, each the best of ``tournament`` random members of the top fraction of ``ranked``.

        With a lineage ``cap`` (from :meth:`_places`), a winner whose lineage
        holds its share gives its place to the member at the same rank among
        the top fraction's members whose lineage has room (or, when none has,
        among all such members; with none at all the cap is not held), and the
        shares fill as parents are chosen. ``ahead``: how many tournaments of
        this size the caller will hold from here on (see :meth:`_winners`).
        """
        pool = ranked[: max(1, math.ceil(self.frac * len(ranked)))]
        won = self._winners(ctx, len(pool), k, ahead).tolist()
        if cap is None:
            return [pool[w] for w in won]
        origin, share, held = cap["origin"], cap["share"], cap["held"]
        out, room = [], None  # room: the members a full lineage's winner may give its place to
        for w in won:
            m = pool[w]
            if held[origin[m]] >= share:
                if room is None:
                    room = ([i for i in pool if held[origin[i]] < share]
                            or [i for i in ranked if held[origin[i]] < share] or pool)
                m = room[w * len(room) // len(pool)]
            held[origin[m]] += 1
            if held[origin[m]] == share:
                room = None
            out.append(m)
        return out

    def _winners(self, ctx: SearchContext, n: int, k: int, ahead: int) -> np.ndarray:
        """Pool positions of ``k`` winners, each the best (smallest) of ``tournament`` uniform draws in [0, n).

        The draws come from the strategy stream's next numpy generator and
        depend only on its counter, so those of the next ``ahead`` tournaments
        of the same size are drawn together (one warm pass instead of one cold
        pass between model calls); the stream advances by one per tournament,
        as drawing each one when it is held does, so the values are the same.
        """
        rng = ctx.rng
        cache = self._drawn
        key = (rng.seed, rng.counter, n, k, self.tournament)
        won = cache.pop(key, None)
        if won is None:
            cache.clear()
            for j in range(max(1, ahead)):
                draws = StrategyRNG(rng.seed, rng.counter + j).numpy().integers(0, n, size=(k, self.tournament))
                cache[(rng.seed, rng.counter + j, n, k, self.tournament)] = draws.min(axis=1)
            won = cache.pop(key)
        rng.counter += 1
        return won

    @staticmethod
    def _grow(arch: dict, out, s, final: State, noise: State | None = None, snap: State | None = None) -> dict:
        """Append finished candidates to the archive.

        Noise-generation members also bring their initial noise and their latent
        at the first evolution stage (``snap``), from which later generations breed;
        the archive keeps those for its first members only, the noise generations.
        """
        both = lambda a, b: a if b is None else State.cat([a, b])  # noqa: E731
        return {"outputs": concat([arch["outputs"], out]), "scores": torch.cat([arch["scores"], s]),
                "final": State.cat([arch["final"], final]), "noise": both(arch["noise"], noise),
                "snap": arch["snap"] if snap is None else both(arch["snap"], snap)}


def ranking(scores: torch.Tensor) -> list[int]:
    """Candidate indices best first, as plain integers; ties keep the earlier candidate (:func:`top_k`)."""
    return top_k(scores, len(scores)).tolist()
