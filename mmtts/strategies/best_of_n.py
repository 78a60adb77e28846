"""Best-of-N (random search over initial noise): run N independent candidates, keep the best."""

from __future__ import annotations

import torch

from ..core.batch import concat, take
from ..core.errors import BudgetError
from ..core.registry import STRATEGIES
from ..core.state import State
from ..core.strategy import SearchContext, Selection, Strategy


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best scores, best first; ties keep the earlier candidate (stable)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k]


@STRATEGIES.register("best-of-n")
class BestOfN(Strategy):
    """N fresh candidates, each run to the end and scored once; return the top ``keep``.

    ``n=None`` spends the budget: N = floor(budget / cost of one candidate).
    Candidates run in chunks of ``batch_size``; the trace gets one point per
    chunk, and a checkpoint is written after each chunk.
    """

    def __init__(self, n: int | None = None, batch_size: int = 64, keep: int = 1):
        if n is not None and n < 1:
            raise ValueError(f"best-of-n needs n >= 1 candidates, got n={n}")
        if batch_size < 1 or keep < 1:
            raise ValueError(f"batch_size ({batch_size}) and keep ({keep}) must be at least 1")
        super().__init__(n=n, batch_size=batch_size, keep=keep)
        self.n, self.batch_size, self.keep = n, batch_size, keep

    def plan(self, ctx: SearchContext) -> int:
        cap = ctx.candidates_affordable()
        if self.n is not None:
            if cap != -1 and self.n > cap:
                ctx.budget.require_candidates(self.n, ctx.process.nfe_per_candidate())
            return self.n
        if cap == -1:
            return -1  # time-limited: run chunks until the clock says stop
        if cap < 1:
            ctx.budget.require_candidates(1, ctx.process.nfe_per_candidate())
        return cap

    def run(self, ctx: SearchContext) -> Selection:
        loop = ctx.restored or {"done": 0, "best": None, "total": self.plan(ctx)}
        best: dict | None = loop["best"]
        done, total = loop["done"], loop["total"]
        while total == -1 or done < total:
            if total == -1 and done > 0 and ctx.budget.out_of_time():
                break
            m = self.batch_size if total == -1 else min(self.batch_size, total - done)
            state = ctx.advance(ctx.fresh(m))
            out = ctx.finish(state)
            s = ctx.score(out, state)
            best = merge_top(best, out, s, state, self.keep)
            done += m
            ctx.checkpoint({"done": done, "best": best, "total": total})
        if best is None:
            raise BudgetError("the time limit ran out before a single candidate finished")
        return Selection(outputs=best["outputs"], scores=best["scores"], state=best["state"],
                         extra={"n": done})


def merge_top(best: dict | None, out, s: torch.Tensor, state: State, keep: int) -> dict:
    """The top ``keep`` of the candidates kept so far and a new finished batch."""
    if best is not None:
        out = concat([best["outputs"], out])
        s = torch.cat([best["scores"], s])
        state = State.cat([best["state"], state])
    idx = top_k(s, keep)
    return {"outputs": take(out, idx), "scores": s[idx], "state": state.select(idx)}
