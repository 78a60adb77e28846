"""Particle filtering (sequential Monte Carlo, FK steering) over the stages of a stochastic process."""

from __future__ import annotations

import torch

from ..core.batch import take
from ..core.errors import BudgetError
from ..core.registry import STRATEGIES
from ..core.settings import choice, flag, real, whole
from ..core.strategy import SearchContext, Selection, Strategy, top_k
from .resampling import FORKS, SCHEMES, effective_sample_size, fork_copies, fork_points, resample, warn_if_collapsed

POTENTIALS = ("diff", "max", "add", "rt")
_BOUND = 1e300  # |lmbda * potential| is held below this, so sums of a few of them stay finite


def tempered(lmbda: float, phi: torch.Tensor) -> torch.Tensor:
    """lmbda * phi as a log-weight: a candidate ranked last (phi = -inf) keeps weight 0 whatever lmbda (even 0),
    and a product too large for a float is held at +-1e300 instead of overflowing to inf."""
    return torch.where(phi == float("-inf"), phi, (lmbda * phi).clamp(-_BOUND, _BOUND))


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
    The answer is the best ``keep`` of the finished particles (before the
    final resampling, which only copies some of them into the population).

    Resampled copies of a particle must diverge afterwards. With
    ``fork="noise"`` (the default) they draw their own fresh noise, so the
    process must be stochastic after the resampling: a check at a stage
    after which the process declares every step deterministic
    (:meth:`~mmtts.core.process.Process.is_stochastic`, e.g. DDIM's last
    step) does not resample, and a process deterministic after every check
    (DDIM with eta = 0) is refused with the fix: a stochastic schedule
    (eta > 0) or ``fork="perturb"``, which mutates every copy but the first
    with the process's ``perturb`` at the stage's own noise scale (a
    resampling whose perturbation changes nothing is not taken).
    ``extra["distinct"]`` counts the different finished particles; a
    :class:`~mmtts.core.errors.CollapseWarning` says when some are copies.

    Args:
        n: the number of particles (None: as many as the budget pays for, up to 65536).
        potential: ``diff``, ``max``, ``add`` or ``rt`` (see above).
        lmbda: the inverse temperature of the potentials.
        resampling: ``systematic`` or ``multinomial``.
        ess_threshold: resample when ESS < ess_threshold * n (1.0: always, 0.0: never).
        interval: stages between resampling checks.
        final_resample: resample at the last stage.
        keep: how many of the best finished particles to return.
        fork: how resampled copies come to differ: ``"noise"`` (their own fresh noise) or ``"perturb"``.
    """

    def __init__(self, n: int | None = None, potential: str = "diff", lmbda: float = 10.0,
                 resampling: str = "systematic", ess_threshold: float = 0.5, interval: int = 1,
                 final_resample: bool = True, keep: int = 1, fork: str = "noise"):
        me = "particle-filter"
        potential, resampling = choice("potential", potential, POTENTIALS, me), choice("resampling", resampling,
                                                                                         SCHEMES, me)
        ess_threshold, lmbda = real("ess_threshold", ess_threshold, me, 0.0, 1.0), real("lmbda", lmbda, me, 0.0)
        n, interval, keep = whole("n", n, me, none=True), whole("interval", interval, me), whole("keep", keep, me)
        final_resample, fork = flag("final_resample", final_resample, me), choice("fork", fork, FORKS, me)
        super().__init__(n=n, potential=potential, lmbda=lmbda, resampling=resampling, ess_threshold=ess_threshold,
                         interval=interval, final_resample=final_resample, keep=keep, fork=fork)
        self.n, self.potential, self.lmbda, self.scheme = n, potential, lmbda, resampling
        self.ess_threshold, self.interval, self.final_resample = ess_threshold, interval, final_resample
        self.keep, self.fork = keep, fork

    def plan(self, ctx: SearchContext) -> int:
        calls = ctx.process.num_stages  # one preview score per stage; the last is the final score
        cap = ctx.candidates_affordable(calls)
        n = self.n
        if n is None:
            if cap == -1:
                raise BudgetError("particle-filter with n=None needs an NFE or verifier-call cap to size n")
            n = ctx.auto_population(cap, "n")
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
        checks = list(range(self.interval, T, self.interval)) if self.ess_threshold > 0 and self.lmbda > 0 else []
        checks = set(fork_points(ctx.process, checks, self.fork, "particle-filter"))
        finished = None
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
                log_w = log_w + tempered(self.lmbda, torch.nan_to_num(inc, nan=float("-inf")))
                prev = r
            else:
                phi = {"max": hist_max, "add": hist_sum, "rt": r}[self.potential]
                log_w = tempered(self.lmbda, phi)
            ess = effective_sample_size(log_w)
            ess_trace.append(ess)
            if last:
                finished = (out, r, state)
            due = (t in checks and ess < self.ess_threshold * n) or (last and self.final_resample)
            if due:
                idx = resample(log_w, n, self.scheme, ctx.rng.numpy())
                kids = state.resample(idx) if last else fork_copies(ctx, state, idx, self.fork)
                if kids is not None:
                    state = kids
                    out, r = take(out, idx), r[idx]
                    prev, hist_max, hist_sum = prev[idx], hist_max[idx], hist_sum[idx]
                    log_w = torch.zeros(n, dtype=torch.float64)
                    resampled_at.append(t)
            if not last:
                ctx.checkpoint({"state": state, "log_w": log_w, "prev": prev, "hist_max": hist_max,
                                "hist_sum": hist_sum, "ess": ess_trace, "resampled_at": resampled_at})
        f_out, f_r, f_state = finished
        order = top_k(f_r, self.keep)
        distinct = warn_if_collapsed(f_out, "particle-filter", ctx.process, self.fork)
        return Selection(outputs=take(f_out, order), scores=f_r[order], state=f_state.select(order),
                         population=out, population_scores=r,
                         extra={"n": n, "ess": ess_trace, "resampled_at": resampled_at, "distinct": distinct})
