"""Top-k beam search over the stages of a stochastic process."""

from __future__ import annotations

from ..core.batch import take
from ..core.errors import BudgetError
from ..core.registry import STRATEGIES
from ..core.settings import choice, whole
from ..core.strategy import SearchContext, Selection, Strategy, top_k
from .resampling import FORKS, fork_copies, fork_points, warn_if_collapsed


@STRATEGIES.register("beam")
class Beam(Strategy):
    """Keep ``beams`` candidates; every ``interval`` stages each spawns ``width`` children.

    Survivors are chosen by the verifier's score of the preview (x0-hat). The
    population is ``beams * width`` at every stage, so the cost is ``beams *
    width`` candidates' worth of NFE; ``width=None`` spends the budget.

    Children of one parent share its past and must differ from then on. With
    ``fork="noise"`` (the default) they draw their own noise from forked
    streams, so the process must be stochastic after the selection: a
    selection stage after which the process declares every step
    deterministic (:meth:`~mmtts.core.process.Process.is_stochastic`, e.g. the
    last step of DDIM at any eta) is skipped, and a process deterministic
    after every selection stage (DDIM with eta = 0) is refused with the fix:
    a stochastic schedule (eta > 0) or ``fork="perturb"``. With
    ``fork="perturb"`` every child but the first of a parent is mutated by the
    process's ``perturb`` at the stage's own noise scale, which works on
    deterministic schedules too; a selection whose perturbation changes
    nothing is skipped. ``extra["distinct"]`` counts the different final
    outputs, and a :class:`~mmtts.core.errors.CollapseWarning` says when some
    are copies (a process that does not declare its stochasticity).

    Args:
        beams: survivors kept at each scoring.
        width: children per survivor (None: as many as the budget pays for, up to 65536 candidates in all).
        interval: stages between scorings.
        keep: how many of the best finished candidates to return.
        fork: how children of one parent come to differ: ``"noise"`` (their own fresh noise) or
            ``"perturb"`` (a mutation of each copy).
    """

    def __init__(self, beams: int = 4, width: int | None = None, interval: int = 1, keep: int = 1,
                 fork: str = "noise"):
        beams, width = whole("beams", beams, "beam"), whole("width", width, "beam", none=True)
        interval, keep = whole("interval", interval, "beam"), whole("keep", keep, "beam")
        fork = choice("fork", fork, FORKS, "beam")
        super().__init__(beams=beams, width=width, interval=interval, keep=keep, fork=fork)
        self.beams, self.width, self.interval, self.keep, self.fork = beams, width, interval, keep, fork

    def plan(self, ctx: SearchContext) -> tuple[int, list[int]]:
        T = ctx.process.num_stages
        checkpoints = fork_points(ctx.process, list(range(self.interval, T, self.interval)), self.fork, "beam")
        calls_per_candidate = len(checkpoints) + 1
        cap = ctx.candidates_affordable(calls_per_candidate)
        width = self.width
        if width is None:
            if cap == -1:
                raise BudgetError("beam with width=None needs an NFE or verifier-call cap to size its width")
            width = ctx.auto_population(self.beams * (cap // self.beams), "width") // self.beams
        if width < 1 or (cap != -1 and self.beams * width > cap):
            ctx.require_candidates(self.beams * max(width, 1), calls_per_candidate)
        return width, checkpoints

    def run(self, ctx: SearchContext) -> Selection:
        loop = ctx.restored
        if loop is None:
            width, points = self.plan(ctx)
            loop = {"state": ctx.fresh(self.beams * width), "width": width, "points": points}
        state, width, points = loop["state"], loop["width"], loop["points"]
        while True:
            stage = int(state.stage.max())
            nxt = next((t for t in points if t > stage), ctx.process.num_stages)
            state = ctx.advance(state, nxt - stage)
            if nxt >= ctx.process.num_stages:
                break
            s = ctx.score(ctx.preview(state), state, final=False)
            kids = fork_copies(ctx, state, top_k(s, self.beams).repeat_interleave(width), self.fork)
            state = state if kids is None else kids
            ctx.checkpoint({"state": state, "width": width, "points": points})
        out = ctx.finish(state)
        s = ctx.score(out, state)
        order = top_k(s, self.keep)
        distinct = warn_if_collapsed(out, "beam", ctx.process, self.fork)
        return Selection(outputs=take(out, order), scores=s[order], state=state.select(order),
                         population=out, population_scores=s,
                         extra={"width": width, "points": points, "distinct": distinct})
