"""Best-of-N (random search over initial noise): run N independent candidates, keep the best."""

from __future__ import annotations

from ..core.registry import STRATEGIES
from ..core.settings import whole
from ..core.strategy import SearchContext, Selection, Strategy, merge_top


@STRATEGIES.register("best-of-n")
class BestOfN(Strategy):
    """N fresh candidates, each run to the end and scored once; return the top ``keep``.

    Candidates run in chunks of ``batch_size``; the trace gets one point per
    chunk, and a checkpoint is written after each chunk. Under a time-only
    budget (``n=None`` and only ``max_seconds``) chunks run until the deadline.

    Args:
        n: the number of candidates; None spends the budget: floor(budget / cost of one candidate).
        batch_size: candidates run together in one chunk.
        keep: how many of the best candidates to return.
    """

    def __init__(self, n: int | None = None, batch_size: int = 64, keep: int = 1):
        n, batch_size = whole("n", n, "best-of-n", none=True), whole("batch_size", batch_size, "best-of-n")
        keep = whole("keep", keep, "best-of-n")
        super().__init__(n=n, batch_size=batch_size, keep=keep)
        self.n, self.batch_size, self.keep = n, batch_size, keep

    def plan(self, ctx: SearchContext) -> int:
        """The number of candidates, or -1 for as many as the deadline allows."""
        cap = ctx.candidates_affordable()
        if self.n is not None:
            if cap != -1 and self.n > cap:
                ctx.require_candidates(self.n)
            return self.n
        if cap == -1:
            return -1  # time-limited: run chunks until the deadline stops the search
        if cap < 1:
            ctx.require_candidates(1)
        return cap

    def run(self, ctx: SearchContext) -> Selection:
        loop = ctx.restored or {"done": 0, "best": None, "total": self.plan(ctx)}
        best: dict | None = loop["best"]
        done, total = loop["done"], loop["total"]
        while total == -1 or done < total:
            m = self.batch_size if total == -1 else min(self.batch_size, total - done)
            state = ctx.advance(ctx.fresh(m))
            out = ctx.finish(state)
            s = ctx.score(out, state)
            best = merge_top(best, out, s, state, self.keep)
            done += m
            ctx.checkpoint({"done": done, "best": best, "total": total})
        return Selection(outputs=best["outputs"], scores=best["scores"], state=best["state"],
                         extra={"n": done})
