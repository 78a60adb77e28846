"""Top-k beam search over the stages of a stochastic process."""

from __future__ import annotations

import torch

from ..core.batch import take
from ..core.errors import BudgetError
from ..core.registry import STRATEGIES
from ..core.strategy import SearchContext, Selection, Strategy, top_k


@STRATEGIES.register("beam")
class Beam(Strategy):
    """Keep ``beams`` candidates; every ``interval`` stages each spawns ``width`` children.

    Children of one parent share its past and draw their own noise from then
    on (forked streams), so the process must be stochastic for children to
    differ. Survivors are chosen by the verifier's score of the preview
    (x0-hat). The population is ``beams * width`` at every stage, so the cost is
    ``beams * width`` candidates' worth of NFE; ``width=None`` spends the budget.

    Args:
        beams: survivors kept at each scoring.
        width: children per survivor (None: as many as the budget pays for).
        interval: stages between scorings.
        keep: how many of the best finished candidates to return.
    """

    def __init__(self, beams: int = 4, width: int | None = None, interval: int = 1, keep: int = 1):
        if beams < 1 or interval < 1 or keep < 1 or (width is not None and width < 1):
            raise ValueError(f"beam needs beams, width, interval and keep >= 1; got {beams}, {width}, {interval}, "
                             f"{keep}")
        super().__init__(beams=beams, width=width, interval=interval, keep=keep)
        self.beams, self.width, self.interval, self.keep = beams, width, interval, keep

    def plan(self, ctx: SearchContext) -> tuple[int, list[int]]:
        T = ctx.process.num_stages
        checkpoints = [t for t in range(self.interval, T, self.interval)]
        calls_per_candidate = len(checkpoints) + 1
        cap = ctx.candidates_affordable(calls_per_candidate)
        width = self.width
        if width is None:
            if cap == -1:
                raise BudgetError("beam with width=None needs an NFE or verifier-call cap to size its width")
            width = cap // self.beams
        if width < 1 or (cap != -1 and self.beams * width > cap):
            ctx.require_candidates(self.beams * max(width, 1), calls_per_candidate)
        return width, checkpoints

    def run(self, ctx: SearchContext) -> Selection:
        loop = ctx.restored
        if loop is None:
            width, points = self.plan(ctx)
            loop = {"state": ctx.fresh(self.beams * width), "width": width, "points": points}
        state, width, points = loop["state"], loop["width"], loop["points"]
        pop = self.beams * width
        while True:
            stage = int(state.stage.max())
            nxt = next((t for t in points if t > stage), ctx.process.num_stages)
            state = ctx.advance(state, nxt - stage)
            if nxt >= ctx.process.num_stages:
                break
            s = ctx.score(ctx.preview(state), state, final=False)
            keep = top_k(s, self.beams)
            state = state.resample(keep.repeat_interleave(width))
            ctx.checkpoint({"state": state, "width": width, "points": points})
        out = ctx.finish(state)
        s = ctx.score(out, state)
        order = top_k(s, self.keep)
        return Selection(outputs=take(out, order), scores=s[order], state=state.select(order),
                         population=out, population_scores=s, extra={"width": width})
