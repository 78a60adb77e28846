"""Search over paths: re-noise candidates forward, solve back past where they were, keep the best."""

from __future__ import annotations

import torch

from ..core.batch import take
from ..core.errors import BudgetError, SettingsError
from ..core.registry import STRATEGIES
from ..core.settings import real, whole
from ..core.strategy import SearchContext, Selection, Strategy, top_k


@STRATEGIES.register("paths")
class PathSearch(Strategy):
    """``n`` paths are denoised to stage ``start``; then, repeatedly, each spawns ``width`` children
    that are re-noised ``forward`` stages by the forward Gaussian transition and denoised
    ``backward`` (> forward) stages, past where the parent stood; the ``n`` best children by
    preview score survive. The last round ends at the final stage and is scored on final outputs.

    ``n=None`` spends the budget. With ``start`` at the last stage there is no path step and the
    strategy is best-of-n.

    Args:
        n: the number of paths kept (None: as many as the budget pays for, up to 65536 children a round).
        width: children per path in each round.
        start: the fraction of the stages denoised before the first round, in [0, 1].
        forward: stages re-noised in each round.
        backward: stages denoised in each round (> forward).
        keep: how many of the best finished candidates to return.
    """

    def __init__(self, n: int | None = None, width: int = 4, start: float = 0.25, forward: int = 1,
                 backward: int = 2, keep: int = 1):
        n, width, keep = whole("n", n, "paths", none=True), whole("width", width, "paths"), whole("keep", keep, "paths")
        forward, backward = whole("forward", forward, "paths"), whole("backward", backward, "paths")
        if backward <= forward:
            raise SettingsError(f"paths needs 1 <= forward < backward to move past the parent; got forward={forward}, "
                                f"backward={backward}")
        start = real("start", start, "paths", 0.0, 1.0)
        super().__init__(n=n, width=width, start=start, forward=forward, backward=backward, keep=keep)
        self.n, self.width, self.start, self.fwd, self.bwd, self.keep = n, width, start, forward, backward, keep

    def rounds(self, T: int) -> tuple[int, list[tuple[int, int]]]:
        """The start stage and each round's (re-noised stage, stage reached)."""
        s0 = max(int(round(self.start * T)), self.fwd) if T > self.fwd else T
        s0 = min(s0, T)
        out, cur = [], s0
        while cur < T:
            lo = cur - self.fwd
            hi = min(lo + self.bwd, T)
            out.append((lo, hi))
            cur = hi
        return s0, out

    def plan(self, ctx: SearchContext) -> int:
        p = ctx.process
        T = p.num_stages
        s0, rounds = self.rounds(T)
        cost = lambda a, b: int(p.stage_nfe(torch.arange(a, b)).sum())  # noqa: E731
        nfe_per_path = cost(0, s0) + sum(self.width * cost(lo, hi) for lo, hi in rounds)
        calls_per_path = self.width * len(rounds) if rounds else 1
        m = ctx.meter
        cap = min(m.remaining_nfe / nfe_per_path, m.remaining_verifier_calls / calls_per_path)
        n = self.n
        if n is None:
            if cap == float("inf"):
                raise BudgetError("paths with n=None needs an NFE or verifier-call cap to size n; pass n= to "
                                  "search under a time limit only")
            n = ctx.auto_population(int(cap) * self.width, "n") // self.width
        if n < 1 or n > cap:
            raise BudgetError(f"the budget pays for {int(cap)} path(s) but paths needs {max(n, 1)}; one path costs "
                              f"{nfe_per_path} NFE and {calls_per_path} verifier calls with width={self.width}")
        return n

    def run(self, ctx: SearchContext) -> Selection:
        T = ctx.process.num_stages
        s0, rounds = self.rounds(T)
        loop = ctx.restored
        if loop is None:
            n = self.plan(ctx)
            loop = {"state": ctx.advance(ctx.fresh(n), s0), "round": 0, "n": n}
            ctx.checkpoint(loop)
        state, n = loop["state"], loop["n"]
        if not rounds:
            out = ctx.finish(state)
            s = ctx.score(out, state)
        while loop["round"] < len(rounds):
            lo, hi = rounds[loop["round"]]
            kids = state.resample(torch.arange(len(state)).repeat_interleave(self.width))
            kids = ctx.renoise(kids, int(kids.stage.max()) - lo)
            kids = ctx.advance(kids, hi - lo)
            last = hi >= T
            out = ctx.finish(kids) if last else ctx.preview(kids)
            s = ctx.score(out, kids, final=last)
            best = top_k(s, n)
            state = kids.select(best)
            out, s = take(out, best), s[best]
            loop.update(state=state, round=loop["round"] + 1)
            if not last:
                ctx.checkpoint(loop)
        order = top_k(s, self.keep)
        return Selection(outputs=take(out, order), scores=s[order], state=state.select(order),
                         extra={"n": n, "start": s0, "rounds": len(rounds)})
