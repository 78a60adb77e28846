"""TTS-VAR: a descending batch over the scales of a VAR, diverse at coarse scales, selective at fine ones.

The batch starts wide and shrinks only at two kinds of scales. At a coarse
*clustering* scale the previews are embedded by a feature extractor, each
image's patch features are reduced to a structure map (the projection on the
first principal component of its own patches), and k-means over those maps
keeps the candidate nearest each centroid: the survivors differ in layout, not
in score. At a fine *resampling* scale the verifier scores the previews and
survivors are drawn with replacement in proportion to exp(lmbda * potential),
where the potential summarises each candidate's scores at the resampling
scales so far. Duplicates continue with their parent's KV cache and a forked
random stream. The last batch is finished, scored, and the best returned.
The feature extractor is a verifier-like network: its time is counted on the
verifier clock and reported on its own as ``Selection.extra["features_s"]``;
``Selection.extra["cluster_s"]`` is the rest of the clustering (the
duplicate check, structure maps and k-means), outside the model, decode and
verifier clocks.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable, Sequence

import numpy as np
import torch

from ..core.batch import take
from ..core.errors import BudgetError, MmttsError
from ..core.registry import STRATEGIES
from ..core.strategy import SearchContext, Selection, Strategy, top_k
from .resampling import resample

POTENTIALS = ("value", "diff", "sum", "max", "topk")


def potential(history: torch.Tensor, kind: str, k: int = 2) -> torch.Tensor:
    """The potential of each candidate from its scores at the resampling scales so far (B, T), latest last.

    ``value``: the latest score; ``diff``: latest minus the previous one (the latest alone at the first
    resampling scale); ``sum`` and ``max`` of the history; ``topk``: the mean of its ``k`` best scores
    (all of them while fewer). A NaN (a difference of two -inf scores) becomes -inf.
    """
    if kind not in POTENTIALS:
        raise MmttsError(f"unknown potential {kind!r}; choose one of {POTENTIALS}")
    h = torch.as_tensor(history, dtype=torch.float64)
    if h.ndim != 2 or h.shape[1] == 0:
        raise MmttsError(f"a potential needs a (candidates, scales) score history, got shape {tuple(h.shape)}")
    if kind == "value":
        out = h[:, -1]
    elif kind == "diff":
        out = h[:, -1] - h[:, -2] if h.shape[1] > 1 else h[:, -1]
    elif kind == "sum":
        out = h.sum(1)
    elif kind == "max":
        out = h.max(1).values
    else:
        out = h.topk(min(k, h.shape[1]), dim=1).values.mean(1)
    return torch.nan_to_num(out, nan=float("-inf"))


def structure_maps(features: torch.Tensor) -> torch.Tensor:
    """Per-image PCA structure maps: (B, P, D) patch features to (B, P), or global (B, D) features unchanged.

    Each image's patches are centred and projected on their own first principal
    component; the sign is fixed so that the largest entry in magnitude is
    positive (a component's sign is arbitrary). A (B, C, H, W) feature map is
    read as H*W patches of C channels.
    """
    f = torch.as_tensor(features).detach().double().cpu()
    if f.ndim == 4:
        f = f.flatten(2).transpose(1, 2)
    if not bool(torch.isfinite(f).all()):
        bad = int((~torch.isfinite(f.reshape(len(f), -1)).all(1)).sum())
        raise MmttsError(f"the feature extractor returned NaN/inf for {bad} of {len(f)} candidates; check it on "
                         "these previews or pass features= another extractor")
    if f.ndim == 2:
        return f
    if f.ndim != 3:
        raise MmttsError(f"features must be (B, D), (B, P, D) or (B, C, H, W), got shape {tuple(f.shape)}")
    x = f - f.mean(1, keepdim=True)
    # x = U S V^T, so the projection on the first component x v_1 is s_1 u_1: the top eigenvector of the
    # (P, P) Gram matrix scaled by the root of its eigenvalue
    proj = torch.from_numpy(top_components((x @ x.transpose(1, 2)).numpy()))
    sign = torch.sign(proj.gather(1, proj.abs().argmax(1, keepdim=True)))
    return proj * torch.where(sign == 0, 1.0, sign)


def top_components(gram: np.ndarray, squarings: int = 10, rtol: float = 1e-10) -> np.ndarray:
    """sqrt(lambda_1) u_1 of each symmetric PSD matrix of ``gram`` (B, P, P), up to sign.

    Repeated squaring (each power normalised by its trace) turns a matrix into
    the projector on its top eigenvector once ``(lambda_2 / lambda_1) ** (2 ** squarings)``
    vanishes, which costs a dozen small batched products, a fraction of a
    batched eigendecomposition of small matrices. A matrix whose column does
    not satisfy the eigen-equation to ``rtol`` (top eigenvalues too close, or a
    zero matrix) is decomposed exactly (``numpy.linalg.eigh``).
    """
    g = np.asarray(gram, dtype=np.float64)
    trace = np.trace(g, axis1=1, axis2=2)
    m = g / np.where(trace > 0, trace, 1.0)[:, None, None]
    for _ in range(squarings):
        m = m @ m
        t = np.trace(m, axis1=1, axis2=2)
        m /= np.where(t > 0, t, 1.0)[:, None, None]
    rows = np.arange(len(g))
    v = m[rows, :, np.argmax(np.diagonal(m, axis1=1, axis2=2), axis=1)]  # the projector's fullest column
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)
    gv = np.einsum("bij,bj->bi", g, v)
    lam = np.einsum("bi,bi->b", v, gv)
    bad = ~(np.linalg.norm(gv - lam[:, None] * v, axis=1) <= rtol * np.maximum(trace, 1e-300))
    if bad.any():
        w, vec = np.linalg.eigh(g[bad])
        v[bad], lam[bad] = vec[:, :, -1], w[:, -1]
    return v * np.sqrt(np.clip(lam, 0, None))[:, None]


CLUSTER_INITS = ("ward", "k-means++")


def distinct_copies(points, k: int) -> torch.Tensor | None:
    """With at most ``k`` distinct rows among ``points``: the first copy of each, then further copies in index
    order, ``k`` indices sorted; None when there are more distinct rows than ``k`` (they need clustering)."""
    x = torch.as_tensor(points).reshape(len(points), -1).cpu().numpy()
    if k >= len(x):
        return torch.arange(len(x))
    seen: dict[bytes, int] = {}
    for i, row in enumerate(np.ascontiguousarray(x + 0)):  # + 0 turns -0.0 into 0.0: equal values, equal bytes
        seen.setdefault(row.tobytes(), i)
        if len(seen) > k:
            return None
    first = np.fromiter(seen.values(), dtype=np.int64)
    rest = np.setdiff1d(np.arange(len(x)), first)[:k - len(first)]
    return torch.tensor(sorted(first.tolist() + rest.tolist()), dtype=torch.int64)


def nearest_to_centroids(points: torch.Tensor, k: int, seed: int, init: str = "k-means++",
                         distinct_first: bool = True) -> torch.Tensor:
    """K-means (scikit-learn) into ``k`` clusters; the index of the point nearest each centroid, sorted.

    ``init="k-means++"`` is scikit-learn's own seeding (``seed`` fixes its
    draws), one pass over the points per centroid, which dominates the cost
    when ``k`` is close to the number of points; ``init="ward"`` seeds the
    k-means with the k clusters of Ward's agglomeration (scipy: the greedy
    merges that raise the k-means objective least, so the points merged first
    are those closest together) and refines them by Lloyd's iterations.
    Identical points are common at coarse scales (candidates whose first
    tokens agree): with at most ``k`` distinct points there is nothing to
    cluster, and the first copy of each distinct point is kept, then further
    copies in index order (``distinct_first=False`` runs the k-means on them
    anyway, as the published code does). When k-means still leaves fewer than ``k``
    distinct clusters, the rest are the remaining points nearest their own
    centroid, and scikit-learn's warning about it is silenced.
    """
    from sklearn import config_context
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    if init not in CLUSTER_INITS:
        raise MmttsError(f"unknown clustering init {init!r}; choose one of {CLUSTER_INITS}")
    x = torch.as_tensor(points, dtype=torch.float64).reshape(len(points), -1).numpy()
    if k >= len(x):
        return torch.arange(len(x))
    if distinct_first:
        idx = distinct_copies(x, k)
        if idx is not None:
            return idx
    if init == "ward":
        from scipy.cluster.hierarchy import cut_tree, fcluster, linkage

        tree = linkage(x, "ward")
        labels = fcluster(tree, k, "maxclust") - 1
        if labels.max() + 1 != k:  # merges tied at the cut: cut_tree (slower) splits the tree at exactly k
            labels = cut_tree(tree, n_clusters=k).reshape(-1)
        start = np.zeros((k, x.shape[1]))
        np.add.at(start, labels, x)
        start /= np.bincount(labels, minlength=k)[:, None]
    # the points are finite (structure_maps refuses NaN/inf) and the parameters fixed here: skip both checks
    with warnings.catch_warnings(), config_context(assume_finite=True, skip_parameter_validation=True):
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=k, n_init=1, random_state=seed, init=start if init == "ward" else "k-means++").fit(x)
    labels = km.labels_
    dist = np.linalg.norm(x - km.cluster_centers_[labels], axis=1)
    order = np.lexsort((dist, labels))  # by cluster, nearest first, the lower index first among equals
    chosen = order[np.r_[True, labels[order][1:] != labels[order][:-1]]].tolist()  # each cluster's nearest
    if len(chosen) < k:
        rest = [i for i in np.argsort(dist, kind="stable").tolist() if i not in chosen]
        chosen += rest[:k - len(chosen)]
    return torch.tensor(sorted(chosen), dtype=torch.int64)


def linear_fractions(stages: int, points: Sequence[int]) -> list[float]:
    """The default schedule shape: the batch falls by equal steps of 1 / (m + 1) after each of the m points."""
    m, out, j = len(points), [], 0
    for k in range(stages):
        out.append((m + 1 - j) / (m + 1))
        j += k in points
    return out


@STRATEGIES.register("tts-var")
class TTSVAR(Strategy):
    """Clustering at coarse scales, potential resampling at fine scales, over a descending batch schedule.

    Args:
        n: the batch at the first scale; None sizes it from the budget (the largest whose schedule fits).
        batches: an explicit batch per scale (non-increasing; a shorter list repeats its last value);
            overrides ``n`` and ``fractions``.
        fractions: the schedule's shape, one fraction of ``n`` per scale (non-increasing, from 1); default:
            equal steps down after each clustering or resampling scale (:func:`linear_fractions`).
        cluster_at: scales (0-based, the scale just generated) whose previews are clustered.
        resample_at: scales whose previews are scored and resampled by potential.
        potential: ``value``, ``diff``, ``sum``, ``max`` or ``topk`` (see :func:`potential`).
        lmbda: the resampling weight is exp(lmbda * potential).
        topk: how many best scores the ``topk`` potential averages.
        features: a function from a batch of previews to features ((B, D), (B, P, D) or (B, C, H, W));
            None uses the verifier's ``features`` method when it has one, else the preview's pixels.
        cluster_init: how the k-means is seeded: ``"ward"`` (Ward's agglomeration, then Lloyd's iterations;
            the default: as good as k-means++ on the validation seeds of ``var-search`` and cheaper when the batch
            shrinks little) or ``"k-means++"`` (scikit-learn's default, as the published code runs it); None
            picks ``"ward"``, or ``"k-means++"`` with ``published``. See :func:`nearest_to_centroids`.
        keep: how many of the best finished candidates to return.
        published: select as the published code does: k-means even over identical structure maps, k-means++
            seeding, the ``value`` potential only (the published code blocks the others); docs/var.md lists
            the departures.
    """

    def __init__(self, n: int | None = None, batches: Sequence[int] | None = None,
                 fractions: Sequence[float] | None = None, cluster_at: Sequence[int] = (1, 2),
                 resample_at: Sequence[int] = (3, 4), potential: str = "value", lmbda: float = 10.0,
                 topk: int = 2, features: Callable | None = None, cluster_init: str | None = None, keep: int = 1,
                 published: bool = False):
        if not isinstance(published, bool):
            raise MmttsError(f"tts-var published={published!r} must be True or False")
        if cluster_init is None:
            cluster_init = "k-means++" if published else "ward"
        if published and (potential != "value" or cluster_init != "k-means++"):
            raise MmttsError(f"tts-var published=True runs the value potential with k-means++ seeding, as the "
                             f"published code does; drop potential={potential!r} / cluster_init={cluster_init!r} "
                             "or published=True")
        if potential not in POTENTIALS:
            raise MmttsError(f"unknown potential {potential!r}; choose one of {POTENTIALS}")
        if cluster_init not in CLUSTER_INITS:
            raise MmttsError(f"unknown cluster_init {cluster_init!r}; choose one of {CLUSTER_INITS}")
        if n is not None and n < 1:
            raise MmttsError(f"tts-var needs n >= 1 candidates, got n={n}")
        if keep < 1 or topk < 1:
            raise MmttsError(f"keep ({keep}) and topk ({topk}) must be at least 1")
        cluster_at, resample_at = sorted(int(k) for k in cluster_at), sorted(int(k) for k in resample_at)
        if set(cluster_at) & set(resample_at):
            raise MmttsError(f"scales {sorted(set(cluster_at) & set(resample_at))} are both clustering and "
                             "resampling scales; give each scale one role")
        if batches is not None:
            batches = [int(b) for b in batches]
            if not batches or min(batches) < 1:
                raise MmttsError(f"batches {batches} must be positive batch sizes, one per scale")
            rising = [k for k in range(1, len(batches)) if batches[k] > batches[k - 1]]
            if rising:
                raise MmttsError(f"batches {batches} increase at scale {rising[0]}: the batch can only shrink "
                                 "(survivors are chosen, never created)")
        if fractions is not None:
            fractions = [float(f) for f in fractions]
            if any(b > a for a, b in zip(fractions, fractions[1:])) or not 0 < min(fractions) <= max(fractions) <= 1:
                raise MmttsError(f"fractions {fractions} must lie in (0, 1] and never increase")
        super().__init__(n=n, batches=batches, fractions=fractions, cluster_at=cluster_at, resample_at=resample_at,
                         potential=potential, lmbda=lmbda, topk=topk, features=features, cluster_init=cluster_init,
                         keep=keep, published=published)
        self.n, self.batches, self.fractions = n, batches, fractions
        self.cluster_at, self.resample_at = cluster_at, resample_at
        self.potential, self.lmbda, self.topk, self.features, self.keep = potential, float(lmbda), topk, features, keep
        self.cluster_init, self.published = cluster_init, published

    # -- the schedule --------------------------------------------------------------------
    def schedule(self, stages: int, n: int) -> list[int]:
        """The batch at each scale for a first batch of ``n``."""
        fr = self.fractions if self.fractions is not None else linear_fractions(stages, self.points)
        if len(fr) != stages:
            raise MmttsError(f"fractions has {len(fr)} values for {stages} scales; give one per scale")
        out = []
        for f in fr:
            out.append(min(max(1, round(n * f)), out[-1] if out else n))
        return out

    @property
    def points(self) -> list[int]:
        return sorted(self.cluster_at + self.resample_at)

    def check(self, stages: int, batches: list[int]) -> None:
        bad = [k for k in self.points if not 0 <= k < stages - 1]
        if bad:
            raise MmttsError(f"clustering/resampling scales {bad} are outside 0..{stages - 2} (the process has "
                             f"{stages} scales; the last scale's batch is finished and scored)")
        for k in range(stages - 1):
            if batches[k + 1] < batches[k] and k not in self.points:
                raise MmttsError(f"the batch shrinks after scale {k} ({batches[k]} -> {batches[k + 1]}), which "
                                 f"is neither a clustering {self.cluster_at} nor a resampling {self.resample_at} "
                                 "scale; shrink only there")

    @staticmethod
    def cost(costs: list[int], batches: list[int]) -> int:
        return sum(c * b for c, b in zip(costs, batches))

    def calls(self, batches: list[int]) -> int:
        """Verifier calls of a schedule: every resampling scale's batch and the final batch."""
        return sum(batches[k] for k in self.resample_at) + batches[-1]

    def plan(self, ctx: SearchContext) -> list[int]:
        K = ctx.process.num_stages
        costs = [int(c) for c in ctx.process.stage_nfe(torch.arange(K, dtype=torch.int64))]
        if self.batches is not None:
            if len(self.batches) > K:
                raise MmttsError(f"batches has {len(self.batches)} entries for a process of {K} scales; give at "
                                 "most one per scale")
            batches = self.batches + [self.batches[-1]] * (K - len(self.batches))
        else:
            b = ctx.budget
            fits = lambda s: ((b.max_nfe is None or self.cost(costs, s) <= b.max_nfe)
                              and (b.max_verifier_calls is None or self.calls(s) <= b.max_verifier_calls))
            n = self.n
            if n is None:
                if b.max_nfe is None and b.max_verifier_calls is None:
                    raise BudgetError("tts-var with n=None needs an NFE or verifier-call cap to size its batch")
                # cost and calls never fall as n grows: double past the largest n that fits, then bisect
                n, hi = 0, 1
                while fits(self.schedule(K, hi)):
                    n, hi = hi, 2 * hi
                while hi - n > 1:
                    mid = (n + hi) // 2
                    n, hi = (mid, hi) if fits(self.schedule(K, mid)) else (n, mid)
            batches = self.schedule(K, max(n, 1))
            if n < 1 or not fits(batches):
                one = self.schedule(K, 1)
                raise BudgetError(f"the budget ({b.max_nfe} NFE, {b.max_verifier_calls} verifier calls) is below "
                                  f"one sample of tts-var ({self.cost(costs, one)} NFE, {self.calls(one)} verifier "
                                  f"calls with batches {one}); raise it to at least {self.cost(costs, one)}")
        self.check(K, batches)
        return batches

    # -- the search ------------------------------------------------------------------------
    def extract(self, ctx: SearchContext, previews) -> tuple[torch.Tensor, float]:
        """The previews' features and the seconds the extractor took (on the verifier clock)."""
        fn = self.features or getattr(ctx.verifier, "features", None)
        t0 = time.perf_counter()
        with torch.no_grad(), ctx.meter.timer("verifier"):
            f = fn(previews) if fn is not None else torch.as_tensor(previews).flatten(1)
        return f, time.perf_counter() - t0

    def run(self, ctx: SearchContext) -> Selection:
        loop = ctx.restored
        if loop is None:
            batches = self.plan(ctx)
            state = ctx.fresh(batches[0])
            loop = {"state": state, "history": torch.empty(batches[0], 0, dtype=torch.float64),
                    "batches": batches, "kept": [], "cluster_s": 0.0, "features_s": 0.0}
        state, history, batches, kept = loop["state"], loop["history"], loop["batches"], loop["kept"]
        cluster_s, features_s = loop["cluster_s"], loop.get("features_s", 0.0)
        K = ctx.process.num_stages
        while int(state.stage.max()) < K:
            state = ctx.step(state)
            k = int(state.stage.max()) - 1
            if k == K - 1:
                break
            nxt = batches[k + 1]
            if k in self.cluster_at and nxt < len(state):
                previews, seed = ctx.preview(state), int(ctx.rng.numpy().integers(2 ** 31))
                t0 = time.perf_counter()
                # identical previews have identical features and maps: with no more distinct previews than
                # survivors nothing needs embedding or clustering
                idx = None if self.published else distinct_copies(previews, nxt)
                if idx is None:
                    cluster_s += time.perf_counter() - t0
                    f, seconds = self.extract(ctx, previews)
                    features_s += seconds
                    t0 = time.perf_counter()
                    idx = nearest_to_centroids(structure_maps(f), nxt, seed, self.cluster_init,
                                               distinct_first=not self.published)
                cluster_s += time.perf_counter() - t0
                state, history = state.select(idx), history[idx]
                kept.append({"scale": k, "kind": "cluster", "index": idx.tolist()})
            elif k in self.resample_at:
                r = ctx.score(ctx.preview(state), state, final=False)
                history = torch.cat([history, r.double()[:, None]], 1)
                log_w = self.lmbda * potential(history, self.potential, self.topk)
                idx = resample(log_w, nxt, "multinomial", ctx.rng.numpy())
                state, history = state.resample(idx), history[idx]
                kept.append({"scale": k, "kind": "resample", "index": idx.tolist()})
            ctx.checkpoint({"state": state, "history": history, "batches": batches, "kept": kept,
                            "cluster_s": cluster_s, "features_s": features_s})
        out = ctx.finish(state)
        s = ctx.score(out, state)
        order = top_k(s, min(self.keep, len(s)))
        return Selection(outputs=take(out, order), scores=s[order], state=state.select(order),
                         population=out, population_scores=s,
                         extra={"batches": batches, "kept": kept, "cluster_s": cluster_s, "features_s": features_s})


__all__ = ["CLUSTER_INITS", "POTENTIALS", "TTSVAR", "distinct_copies", "linear_fractions", "nearest_to_centroids",
           "potential", "structure_maps", "top_components"]
