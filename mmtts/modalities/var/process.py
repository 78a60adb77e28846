"""VARProcess: a next-scale-prediction model as a searchable staged Process; one stage is one scale.

A candidate's state is its token ids so far, f-hat (the sum of its scales'
decoded codes) and the transformer's KV cache, all per-candidate tensors with
the batch on dim 0 (the cache grows by each scale's positions, so copies cost
only what a candidate holds; :meth:`VARProcess.join` concatenates candidates at
different scales, padding their caches). Selecting or
resampling candidates therefore re-indexes the cache with them, and a copy continues from its parent's cache with its own
random stream. Tokens are drawn by inverse CDF from uniforms of each
candidate's stream, so a candidate's sample never depends on its batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ...core.errors import MmttsError
from ...core.process import Process
from ...core.rng import Streams
from ...core.state import State
from .tokenizer import MultiScaleVQ, downsample
from .transformer import NextScaleTransformer

UNITS = ("tokens", "forwards")


def per_scale(value, scales: int, name: str) -> list:
    """One value per scale from a scalar or a sequence of exactly ``scales`` values."""
    if isinstance(value, (list, tuple)):
        if len(value) != scales:
            raise MmttsError(f"{name} has {len(value)} values for {scales} scales; give one value or one per scale")
        return list(value)
    return [value] * scales


def sample_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> torch.Tensor:
    """Token ids (B, n) drawn by inverse CDF of softmax(logits / temperature) at uniforms ``u`` (B, n).

    ``top_k`` > 0 keeps the k most likely tokens, ``top_p`` < 1 the smallest
    set whose mass reaches p (the most likely token always stays).
    """
    logits = logits.double() / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = logits.topk(top_k, -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop_sorted = sorted_p.cumsum(-1) - sorted_p >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u.to(cdf) * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    return idx.clamp_(max=vocab - 1)


class VARProcess(Process):
    """Scale-by-scale sampling of a VAR model (a multi-scale VQ tokenizer and a next-scale transformer).

    Args:
        tokenizer: the :class:`MultiScaleVQ` whose codebook and decoder turn tokens into images.
        transformer: the :class:`NextScaleTransformer` predicting each scale's tokens.
        label: the class to condition on; None samples unconditionally (the null class).
        guidance: classifier-free guidance weight, one value or one per scale. A weight other than 1 at any
            scale runs the conditional and the null-class branch at every scale (each keeps its own cache),
            so every stage costs twice; it needs a ``label``.
        temperature: softmax temperature, one value or one per scale.
        top_k: keep the k most likely tokens (0: all), one value or one per scale.
        top_p: nucleus mass (1: all), one value or one per scale.
        unit: what ``stage_nfe`` counts: ``"tokens"`` (token work: the tokens processed at that scale) or
            ``"forwards"`` (transformer forwards); guidance doubles either. ``work`` counts both.
        device: where the models run.
    """

    decodes_on_preview = True
    decodes_on_finish = True

    def __init__(self, tokenizer: MultiScaleVQ, transformer: NextScaleTransformer, *, label: int | None = None,
                 guidance: float | Sequence[float] = 1.0, temperature: float | Sequence[float] = 1.0,
                 top_k: int | Sequence[int] = 0, top_p: float | Sequence[float] = 1.0, unit: str = "tokens",
                 device: str | torch.device = "cpu"):
        if tuple(tokenizer.scales) != tuple(transformer.scales):
            raise MmttsError(f"tokenizer scales {tokenizer.scales} differ from the transformer's {transformer.scales}")
        if unit not in UNITS:
            raise MmttsError(f"unknown unit {unit!r}; choose one of {UNITS}")
        self.tokenizer, self.transformer = tokenizer.eval(), transformer.eval()
        self.scales = tuple(tokenizer.scales)
        self.num_stages = len(self.scales)
        K = self.num_stages
        self.guidance = [float(g) for g in per_scale(guidance, K, "guidance")]
        self.temperature = [float(t) for t in per_scale(temperature, K, "temperature")]
        self.top_k = [int(k) for k in per_scale(top_k, K, "top_k")]
        self.top_p = [float(p) for p in per_scale(top_p, K, "top_p")]
        if any(t <= 0 for t in self.temperature) or any(not 0 < p <= 1 for p in self.top_p) or min(self.top_k) < 0:
            raise MmttsError("temperature must be > 0, top_p in (0, 1] and top_k >= 0 (0 keeps every token)")
        null = transformer.num_classes
        if label is not None and not 0 <= int(label) < null:
            raise MmttsError(f"label {label} is not a class of this model (0..{null - 1}); None samples "
                             "unconditionally")
        self.guided = any(g != 1.0 for g in self.guidance)
        if self.guided and label is None:
            raise MmttsError("guidance needs a label to guide toward; pass label= or keep guidance=1")
        self.label = null if label is None else int(label)
        self.labels = [self.label, null] if self.guided else [self.label]
        self.unit = unit
        self.device = torch.device(device)
        self.tokens = torch.tensor([s * s for s in self.scales], dtype=torch.int64)
        per = self.tokens if unit == "tokens" else torch.ones(K, dtype=torch.int64)
        self.costs = per * len(self.labels)
        self.work = {"tokens": 0, "forwards": 0}

    # -- costs ---------------------------------------------------------------------------
    def stage_nfe(self, stage: torch.Tensor) -> torch.Tensor:
        """Tokens (or forwards) to generate the scale at ``stage`` for one candidate; x2 with guidance."""
        return self.costs[stage.clamp(max=self.num_stages - 1)]

    def is_stochastic(self, stage: int) -> bool:
        """Every scale draws its tokens from the candidates' streams, except a greedy one (top_k = 1)."""
        return self.top_k[min(int(stage), self.num_stages - 1)] != 1

    def cache_shape(self, n: int, length: int) -> tuple[int, ...]:
        """The KV cache of ``n`` candidates holding ``length`` positions: (n, branches, depth, 2, heads, length,
        head_dim). It grows scale by scale, so copying candidates copies only the scales they have."""
        shape = self.transformer.cache_shape(n)
        return (n, len(self.labels)) + shape[1:-2] + (length, shape[-1])

    def work_per_candidate(self) -> dict[str, int]:
        """Tokens and forwards one candidate costs through every scale (guidance counted)."""
        b = len(self.labels)
        return {"tokens": int(self.tokens.sum()) * b, "forwards": self.num_stages * b}

    # -- the process ---------------------------------------------------------------------
    def init(self, streams: Streams, first_index: int = 0) -> State:
        n, tf = len(streams), self.transformer
        codes = torch.zeros(n, tf.length, dtype=torch.int64, device=self.device)
        lat = self.tokenizer.latent
        fhat = torch.zeros(n, self.tokenizer.code_dim, lat, lat, device=self.device)
        kv = torch.zeros(self.cache_shape(n, 0), device=self.device)
        return State.fresh({"codes": codes, "fhat": fhat, "kv": kv}, streams, first_index)

    def step(self, state: State) -> State:
        stages = state.stage.tolist()
        if min(stages) == max(stages):
            return self._step_scale(state, stages[0])
        # candidates at different scales: each group steps at its own scale, then the batch order is restored
        groups = {k: [i for i, s in enumerate(stages) if s == k] for k in sorted(set(stages))}
        parts = [self._step_scale(state.select(pos), k) for k, pos in groups.items()]
        order = [i for pos in groups.values() for i in pos]
        inverse = torch.empty(len(order), dtype=torch.int64)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return self.join(parts).select(inverse)

    @staticmethod
    def join(states: list[State]) -> State:
        """:meth:`State.cat` for candidates at different scales: shorter KV caches are zero-padded to the longest
        (a step reads only the positions of the scales a candidate has)."""
        length = max(s.data["kv"].shape[-2] for s in states)
        return State.cat([s.replace(kv=F.pad(s.data["kv"], (0, 0, 0, length - s.data["kv"].shape[-2])))
                          for s in states])

    @torch.no_grad()
    def _step_scale(self, state: State, k: int) -> State:
        if not 0 <= k < self.num_stages:
            raise MmttsError(f"no scale {k} to generate: the model has {self.num_stages} scales")
        tf, s = self.transformer, self.scales[k]
        n = len(state)
        fhat = state.data["fhat"]
        inputs = None if k == 0 else downsample(fhat, s).flatten(2).transpose(1, 2)
        # a new cache holding the scales so far and room for this one (the parent state keeps its own); any
        # padding beyond the scales so far (from batching with later candidates) is dropped
        start = tf.bounds[k]
        kv = torch.empty(self.cache_shape(n, tf.bounds[k + 1]), device=self.device)
        kv[..., :start, :] = state.data["kv"][..., :start, :]
        logits = []
        for b, label in enumerate(self.labels):
            labels = torch.full((n,), label, dtype=torch.int64, device=self.device)
            logits.append(tf.forward_scale(k, inputs, labels, kv[:, b]).float())
        out = logits[0] if not self.guided else logits[1] + self.guidance[k] * (logits[0] - logits[1])
        if not bool(torch.isfinite(out).all()):
            raise MmttsError(f"the transformer returned NaN/inf logits at scale {k} ({s}x{s}); check its weights "
                             "and dtype")
        streams = state.streams.clone()  # the input state keeps its streams where they were: stepping is pure
        u = streams.rand((s * s,))
        idx = sample_tokens(out.cpu(), u, self.temperature[k], self.top_k[k], self.top_p[k]).to(self.device)
        lo, hi = tf.bounds[k], tf.bounds[k + 1]
        codes = state.data["codes"].clone()
        codes[:, lo:hi] = idx
        fhat = fhat + self.tokenizer.lookup(idx, s)
        self.work["tokens"] += n * s * s * len(self.labels)
        self.work["forwards"] += n * len(self.labels)
        new = state.replace(codes=codes, fhat=fhat, kv=kv)
        new.stage, new.streams = state.stage + 1, streams
        return new

    @torch.no_grad()
    def decode(self, fhat: torch.Tensor) -> torch.Tensor:
        """f-hat to images in [0, 1] (B, 1, H, W) on the CPU."""
        return self.tokenizer.decode(fhat).float().cpu()

    def preview(self, state: State) -> torch.Tensor:
        """The codes of the scales so far, summed at the latent size and decoded (the VAR analogue of x0-hat)."""
        return self.decode(state.data["fhat"])

    def finish(self, state: State) -> torch.Tensor:
        return self.decode(state.data["fhat"])

    def describe(self) -> dict:
        return {**super().describe(), "scales": list(self.scales), "unit": self.unit, "guidance": self.guidance,
                "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "work_per_candidate": self.work_per_candidate()}
