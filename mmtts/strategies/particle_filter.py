"""Particle filtering (sequential Monte Carlo, FK steering) over the stages of a stochastic process."""

from __future__ import annotations

import torch

from ..core.batch import take
from ..core.errors import BudgetError
from ..core.registry import STRATEGIES
from ..core.strategy import SearchContext, Selection, Strategy, top_k
from .resampling import SCHEMES, effective_sample_size, resample

POTENTIALS = ("diff", "max", "add", "rt")


@STRATEGIES.register("particle-filter")
class ParticleFilter(Strategy):
    """SMC with Feynman-Kac potentials on the verifier's score of each stage's preview.

    Let r_t be the score of a particle's preview after stage t. With
    ``potential="diff"`` the log-weight accumulates lmbda*(r_t - r_{t-1})
    between resamplings (r_0 = 0), so the weights telescope to exp(lmbda*r) of
    the final sample and, with enough particles, the population targets
    p(x) * exp(lmbda * r(x)). ``max``, ``add`` and ``rt`` weight by
    exp(lmbda * phi_t) with phi_t the running maximum, the running sum or the
    current score: the FK-steering heuristics, which favour high reward more
    aggressively but do not target that tilted distribution.

    Resampling happens every ``interval`` stages when ESS < ``ess_threshold`` * n
    (1.0: always, 0.0: never), and at the last stage when ``final_resample``.
    ``n=None`` spends the budget: one preview score per particle per stage.

    Args:
        n: the number of particles (None: as many as the budget pays for).
        potential: ``diff``, ``max``, ``add`` or ``rt`` (see above).
        lmbda: the inverse temperature of the potentials.
        resampling: ``systematic`` or ``multinomial``.
        ess_threshold: resample when ESS < ess_threshold * n (1.0: always, 0.0: never).
        interval: stages between resampling checks.
        final_resample: resample at the last stage.
        keep: how many of the best finished particles to return.
    """

    def __init__(self, n: int | None = None, potential: str = "diff", lmbda: float = 10.0,
                 resampling: str = "systematic", ess_threshold: float = 0.5, interval: int = 1,
                 final_resample: bool = True, keep: int = 1):
        if potential not in POTENTIALS:
            raise ValueError(f"unknown potential {potential!r}; choose one of {POTENTIALS}")
        if resampling not in SCHEMES:
            raise ValueError(f"unknown resampling {resampling!r}; choose one of {SCHEMES}")
        if not 0.0 <= ess_threshold <= 1.0:
            raise ValueError(f"ess_threshold={ess_threshold} must lie in [0, 1]")
        if n is not None and n < 1:
            raise ValueError(f"particle filtering needs n >= 1 particles, got n={n}")
        if interval < 1 or keep < 1:
            raise ValueError(f"interval ({interval}) and keep ({keep}) must be at least 1")
        super().__init__(n=n, potential=potential, lmbda=lmbda, resampling=resampling,
                         ess_threshold=ess_threshold, interval=interval, final_resample=final_resample, keep=keep)
        self.n, self.potential, self.lmbda, self.scheme = n, potential, float(lmbda), resampling
        self.ess_threshold, self.interval, self.final_resample, self.keep = ess_threshold, interval, final_resample, keep

    def plan(self, ctx: SearchContext) -> int:
        calls = ctx.process.num_stages  # one preview score per stage; the last is the final score
        cap = ctx.candidates_affordable(calls)
        n = self.n
        if n is None:
            if cap == -1:
                raise BudgetError("particle-filter with n=None needs an NFE or verifier-call cap to size n")
            n = cap
        if n < 1 or (cap != -1 and n > cap):
            ctx.require_candidates(max(n, 1), calls)
        return n

    def run(self, ctx: SearchContext) -> Selection:
        T = ctx.process.num_stages
        loop = ctx.restored
        if loop is None:
            n = self.plan(ctx)
            state = ctx.fresh(n)
            zeros = torch.zeros(n, dtype=torch.float64)
            loop = {"state": state, "log_w": zeros, "prev": zeros.clone(), "hist_max": torch.full((n,), float("-inf"),
                    dtype=torch.float64), "hist_sum": zeros.clone(), "ess": [], "resampled_at": []}
        state, log_w, prev = loop["state"], loop["log_w"], loop["prev"]
        n = len(state)
        hist_max, hist_sum = loop["hist_max"], loop["hist_sum"]
        ess_trace, resampled_at = loop["ess"], loop["resampled_at"]
        out = r = None
        while int(state.stage.max()) < T:
            state = ctx.step(state)
            t = int(state.stage.max())
            last = t >= T
            out = ctx.finish(state) if last else ctx.preview(state)
            r = ctx.score(out, state, final=last)
            hist_max = torch.maximum(hist_max, r)
            hist_sum = hist_sum + r
            if self.potential == "diff":
                inc = torch.where(torch.isfinite(prev), r - prev, r)
                log_w = log_w + self.lmbda * torch.nan_to_num(inc, nan=float("-inf"))
                prev = r
            else:
                phi = {"max": hist_max, "add": hist_sum, "rt": r}[self.potential]
                log_w = self.lmbda * phi
            ess = effective_sample_size(log_w)
            ess_trace.append(ess)
            due = (t % self.interval == 0 and ess < self.ess_threshold * n) or (last and self.final_resample)
            if due and not (last and not self.final_resample):
                idx = resample(log_w, n, self.scheme, ctx.rng.numpy())
                state = state.resample(idx)
                out, r = take(out, idx), r[idx]
                prev, hist_max, hist_sum = prev[idx], hist_max[idx], hist_sum[idx]
                log_w = torch.zeros(n, dtype=torch.float64)
                resampled_at.append(t)
            if not last:
                ctx.checkpoint({"state": state, "log_w": log_w, "prev": prev, "hist_max": hist_max,
                                "hist_sum": hist_sum, "ess": ess_trace, "resampled_at": resampled_at})
        order = top_k(r, self.keep)
        return Selection(outputs=take(out, order), scores=r[order], state=state.select(order),
                         population=out, population_scores=r,
                         extra={"n": n, "ess": ess_trace, "resampled_at": resampled_at})
