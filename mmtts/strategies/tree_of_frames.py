"""Tree-of-Frames (Video-T1): a breadth-first tree over the units of a frame-autoregressive video."""

from __future__ import annotations

import math

import torch

from ..core.batch import take
from ..core.errors import BudgetError, MmttsError, SettingsError
from ..core.registry import STRATEGIES
from ..core.settings import whole
from ..core.state import State
from ..core.strategy import SearchContext, Selection, Strategy, top_k


def survivors(scores: torch.Tensor, prune: str | float) -> torch.Tensor:
    """Indices kept by a pruning step, best first: ``"median"`` keeps the top ceil(n / 2) (every child at or
    above the median, ties broken toward the earlier child), a fraction f keeps the top ceil(f * n)."""
    n = len(scores)
    k = math.ceil(n / 2) if prune == "median" else max(1, math.ceil(float(prune) * n))
    return top_k(scores, k)


def _check_prune(prune) -> str | float:
    if prune == "median":
        return prune
    if isinstance(prune, bool) or not isinstance(prune, (int, float)) or not 0 < float(prune) <= 1:
        raise SettingsError(f"tree-of-frames prune={prune!r} must be 'median' or a fraction in (0, 1] of each "
                            "level to keep (or a list of them, one per depth in prune_at)")
    return float(prune)


@STRATEGIES.register("tree-of-frames")
class TreeOfFrames(Strategy):
    """A tree over frame units: best-of-``img_branch`` units, branching children, pruning by partial video.

    Depth d of the tree is unit d of the clip. The first unit of each of the
    ``n`` roots is the best of ``img_branch`` candidates by the verifier's
    score of its preview (image-level alignment). At each later depth every
    node gets ``branching[d]`` children (the last value repeats): the first
    continues its parent's noise, the others draw fresh noise for their unit
    (the process's ``perturb`` with scale 1 at the unit's start, on forked
    streams). With ``img_branch`` a list (one value per depth, the last
    repeats) every child's unit is also the best of that many candidates,
    as in the published tree (5 for the first unit, then 2). All candidates
    of a level are denoised together, one batch per stage. After the depths in ``prune_at`` the level is scored on its
    partial videos and only the survivors go on (:func:`survivors`). Leaves
    are scored on the full video; the best ``keep`` are returned.

    By default a level is judged when its unit is finished (Video-T1).
    ``look_ahead=k`` judges it after k denoising steps of its unit instead,
    on the partial video whose last unit is the x0-hat there, and only the
    kept nodes take the unit's remaining steps: the NFE of the losers'
    unfinished steps pays for more candidates.

    A separate verifier per depth (hierarchical prompts) is a verifier that
    reads how far a video goes: :class:`~mmtts.verifiers.video.PerDepth`
    scores a partial video by its number of frames.

    The tree's shape is fixed by the settings; ``n=None`` sizes the number of
    roots from the budget (the largest tree whose NFE and verifier calls fit),
    so the tree never exceeds it. ``extra`` records the shape: ``levels``
    (units started per depth) and ``survivors`` (nodes kept per depth).

    The process must be frame-autoregressive: it declares ``num_units`` and
    ``stages_per_unit`` (as :class:`~mmtts.modalities.video.FrameARProcess`)
    and can ``perturb`` a unit's initial noise.

    Args:
        n: the number of roots (None: as many as the budget pays for).
        img_branch: candidates for each root's first unit, the best one kept; a list gives the candidates per
            unit at depths 0, 1, ... (the last repeats).
        branching: children per node at depths 1, 2, ... (an int, or one value per depth; the last repeats).
        prune_at: the depths after which a level is pruned (default: every depth but the first and the last).
        prune: ``"median"`` (keep the children at or above the median) or the fraction of a level to keep; a
            list gives one rule per depth of ``prune_at``.
        keep: how many of the best leaves to return.
        look_ahead: the denoising steps of a unit after which its level is judged (None: the whole unit).
    """

    def __init__(self, n: int | None = None, img_branch: int | tuple[int, ...] = 4,
                 branching: int | tuple[int, ...] = 2, prune_at: tuple[int, ...] | None = None, prune: str | float | tuple = "median", keep: int = 1,
                 look_ahead: int | None = None):
        me = "tree-of-frames"
        n, keep = whole("n", n, me, none=True), whole("keep", keep, me)
        if isinstance(img_branch, (list, tuple)):
            if not img_branch:
                raise SettingsError("tree-of-frames img_branch needs at least one value")
            img_branch = tuple(whole("img_branch", k, me) for k in img_branch)
        else:
            img_branch = whole("img_branch", img_branch, me)
        branch = (branching,) if isinstance(branching, int) else tuple(branching)
        if not branch:
            raise SettingsError("tree-of-frames branching needs at least one value")
        branch = tuple(whole("branching", b, me) for b in branch)
        if prune_at is not None:
            if isinstance(prune_at, (str, bytes)) or not hasattr(prune_at, "__iter__"):
                raise SettingsError(f"tree-of-frames prune_at={prune_at!r} must be a list of depths")
            prune_at = [whole("prune_at", d, me, minimum=1) for d in prune_at]
        if isinstance(prune, (list, tuple)):
            if prune_at is None or len(prune) != len(prune_at) or len(set(prune_at)) != len(prune_at):
                raise SettingsError(f"tree-of-frames prune={prune!r} gives one rule per depth and needs prune_at "
                                    f"with as many different depths; got prune_at={prune_at!r}")
            rules = dict(zip(prune_at, (_check_prune(r) for r in prune)))
            prune_at = tuple(sorted(rules))
            prune = tuple(rules[d] for d in prune_at)
        else:
            prune = _check_prune(prune)
            prune_at = None if prune_at is None else tuple(sorted(set(prune_at)))
        look_ahead = whole("look_ahead", look_ahead, me, none=True)
        super().__init__(n=n, img_branch=img_branch, branching=branch, prune_at=prune_at, prune=prune, keep=keep,
                         look_ahead=look_ahead)
        self.n, self.img_branch, self.branching, self.prune_at, self.prune, self.keep = (
            n, img_branch, branch, prune_at, prune, keep)
        self.look_ahead = look_ahead

    # -- the tree's shape ----------------------------------------------------------------
    def children(self, depth: int) -> int:
        """Children per node at ``depth`` >= 1."""
        return self.branching[min(depth - 1, len(self.branching) - 1)]

    def candidates(self, depth: int) -> int:
        """Candidates per unit at ``depth``, the best one kept (an int ``img_branch``: the first unit only)."""
        if isinstance(self.img_branch, int):
            return self.img_branch if depth == 0 else 1
        return self.img_branch[min(depth, len(self.img_branch) - 1)]

    def judged(self, depth: int, units: int) -> bool:
        """Whether the level at ``depth`` is scored on its partial videos (a best-of-k or a pruning)."""
        return self.candidates(depth) > 1 or depth in self.pruned_depths(units)

    def rule(self, depth: int) -> str | float:
        """The pruning rule after ``depth`` (a depth in ``prune_at``)."""
        return self.prune[self.prune_at.index(depth)] if isinstance(self.prune, tuple) else self.prune

    def look(self, process) -> int:
        """Denoising steps of a unit before its level is judged."""
        s = process.stages_per_unit
        if self.look_ahead is None:
            return s
        if self.look_ahead > s:
            raise SettingsError(f"tree-of-frames look_ahead={self.look_ahead} must be at most the {s} denoising "
                                "steps of a unit")
        return self.look_ahead

    def pruned_depths(self, units: int) -> tuple[int, ...]:
        if self.prune_at is None:
            return tuple(range(1, units - 1))
        bad = [d for d in self.prune_at if d >= units - 1]
        if bad:
            raise SettingsError(f"tree-of-frames prune_at depths {bad} must be below the last depth ({units - 1}): "
                                "leaves are judged on the full video")
        return self.prune_at

    def shape(self, roots: int, units: int) -> tuple[list[int], list[int]]:
        """Units started per depth and nodes kept per depth, for ``roots`` roots."""
        pruned = self.pruned_depths(units)
        levels, kept = [roots * self.candidates(0)], [roots]
        for d in range(1, units):
            nodes = kept[-1] * self.children(d)
            levels.append(nodes * self.candidates(d))
            kept.append(len(survivors(torch.zeros(nodes), self.rule(d))) if d in pruned else nodes)
        return levels, kept

    def cost(self, process, roots: int) -> tuple[int, int]:
        """NFE and verifier calls of the tree with ``roots`` roots: a level's nodes take its unit's first
        ``look_ahead`` steps, the ones kept the rest."""
        units, s, look = process.num_units, process.stages_per_unit, self.look(process)
        levels, kept = self.shape(roots, units)
        nfe_of = lambda a, b: int(process.stage_nfe(torch.arange(a, b)).sum())  # noqa: E731
        nfe = sum(m * nfe_of(d * s, d * s + look) + k * nfe_of(d * s + look, (d + 1) * s)
                  for d, (m, k) in enumerate(zip(levels, kept)))
        calls = sum(m for d, m in enumerate(levels) if self.judged(d, units)) + kept[-1]
        return nfe, calls

    def plan(self, ctx: SearchContext) -> int:
        p, m = ctx.process, ctx.meter
        fits = lambda r: m.can_afford(*self.cost(p, r))  # noqa: E731

        def refuse(roots: int):
            nfe, calls = self.cost(p, roots)
            raise BudgetError(f"the tree of {roots} root(s) (img_branch={self.img_branch}, branching="
                              f"{self.branching}) costs {nfe} NFE and {calls} verifier calls; the budget has "
                              f"{m.remaining_nfe} NFE and {m.remaining_verifier_calls} calls: raise it or use "
                              "fewer roots or smaller img_branch/branching")
        if self.n is not None:
            if not fits(self.n):
                refuse(self.n)
            return self.n
        if not m.counted:
            raise BudgetError("tree-of-frames with n=None needs an NFE or verifier-call cap to size its tree")
        if not fits(1):
            refuse(1)
        lo, hi = 1, 2
        while fits(hi):
            lo, hi = hi, 2 * hi
            ctx.auto_population(hi * self.candidates(0), "n")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    # -- running -----------------------------------------------------------------------------
    def run(self, ctx: SearchContext) -> Selection:
        p = ctx.process
        if not all(hasattr(p, a) for a in ("num_units", "stages_per_unit")):
            raise MmttsError(f"tree-of-frames grows a tree over frame units and needs a frame-autoregressive "
                             f"process declaring num_units and stages_per_unit (FrameARProcess); "
                             f"{type(p).__name__} does not")
        look = self.look(p)
        loop = ctx.restored
        if loop is None:
            roots = self.plan(ctx)
            state = self.level(ctx, ctx.fresh(roots * self.candidates(0)), 0, look)
            loop = {"roots": roots, "depth": 1, "state": state}
            ctx.checkpoint(loop)
        units, state = p.num_units, loop["state"]
        while loop["depth"] < units:
            d = loop["depth"]
            state = self.level(ctx, self.branch(ctx, state, self.children(d) * self.candidates(d)), d, look)
            loop.update(depth=d + 1, state=state)
            ctx.checkpoint(loop)
        out = ctx.finish(state)
        s = ctx.score(out, state)
        order = top_k(s, self.keep)
        levels, kept = self.shape(loop["roots"], units)
        return Selection(outputs=take(out, order), scores=s[order], state=state.select(order),
                         population=out, population_scores=s,
                         extra={"roots": loop["roots"], "levels": levels, "survivors": kept})

    def level(self, ctx: SearchContext, state: State, depth: int, look: int) -> State:
        """Denoise a level's unit: after ``look`` steps keep the best of each group of candidates and the survivors
        of a pruning, judged on the partial videos; the kept nodes take the unit's remaining steps."""
        p = ctx.process
        state = ctx.advance(state, look)
        if self.judged(depth, p.num_units):
            s = ctx.score(ctx.preview(state), state, final=False)
            k = self.candidates(depth)
            if k > 1:
                s = s.reshape(-1, k)
                best = s.argmax(1) + torch.arange(len(s)) * k  # first of equal scores
                state, s = state.select(best), s.max(1).values
            if depth in self.pruned_depths(p.num_units):
                state = state.select(survivors(s, self.rule(depth)))
        return ctx.advance(state, p.stages_per_unit - look)

    @staticmethod
    def branch(ctx: SearchContext, state: State, k: int) -> State:
        """``k`` children per node: the first continues the node, the others start their unit from fresh noise."""
        if k == 1:
            return state
        kids = state.resample(torch.arange(len(state)).repeat_interleave(k))
        fresh = (torch.arange(len(kids)) % k != 0).to(torch.float64)
        return ctx.perturb(kids, fresh)
