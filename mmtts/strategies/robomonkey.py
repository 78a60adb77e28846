"""RoboMonkey: N policy samples per observation, a fitted Gaussian, K cheap candidates, vote, clip, verify.

A policy forward is the expensive part of a control step; a draw from a
Gaussian fitted to the N samples is nearly free. So the strategy samples N
actions per observation (5 to 9 in the paper), fits a diagonal Gaussian
(unbiased variance), draws K candidates (16 to 32), sets discrete dimensions
(a gripper) by the samples' majority vote, clips to the action bounds,
removes duplicates and lets the verifier choose, as ``sample-verify`` does
with the policy's own samples. The K standard normal draws of an
observation come from the random stream of its first policy sample, so the
whole step is a function of the seed.
"""

from __future__ import annotations

import torch

from ..core.errors import MmttsError
from ..core.registry import STRATEGIES
from ..core.settings import renamed, whole
from ..core.state import State
from ..core.strategy import SearchContext, Strategy
from ..modalities.vla.augment import Candidates, GaussianAugmenter
from .sample_verify import SampleVerify


@STRATEGIES.register("robomonkey")
class RoboMonkey(SampleVerify):
    """Gaussian augmentation of ``policy_samples`` policy samples into ``n`` candidates per observation.

    Args:
        n: K, the candidates per observation (old names ``num_candidates``, ``k``).
        policy_samples: N, the policy samples per observation (old name ``num_samples``); with N = 1 the
            policy's own sample is returned untouched.
        decimals: round before de-duplication (``None``: exact duplicates only).
        chunk: score at most this many candidates per verifier call (``None``: all at once); the deadline is
            checked between chunks.
        select: ``"argmax"``, or ``"softmax"`` to sample a candidate at ``temperature`` from the scores.
        temperature: the softmax temperature.
        deadline_s: seconds from the start of the search after which no more candidates are scored
            (``None``: only a ``Budget(max_seconds=...)`` limits the time).
        published: augment as the published RoboMonkey code does (spread with ``np.var``, gripper by the
            samples' mean, the raw sample when all samples agree; see
            :class:`~mmtts.modalities.vla.augment.GaussianAugmenter`); with a policy that has an action
            ``tokenizer`` (a token VLA), candidates are also de-duplicated on its bins, as the published code does.
        tokenizer: an :class:`~mmtts.modalities.vla.tokens.ActionTokenizer` to de-duplicate on its bins instead of
            on floats (``None``: the policy's own under ``published=True``, else floats).
    """

    def __init__(self, n: int | None = None, policy_samples: int | None = None, decimals: int | None = None,
                 chunk: int | None = None, select: str = "argmax", temperature: float = 1.0,
                 deadline_s: float | None = None, published: bool = False, tokenizer=None, *,
                 num_candidates: int | None = None, k: int | None = None, num_samples: int | None = None):
        if not isinstance(published, bool):
            raise MmttsError(f"robomonkey published={published!r} must be True or False")
        self.published, self.tokenizer = published, tokenizer
        self._setup(renamed(self.name, "n", n, 16, num_candidates=num_candidates, k=k), decimals, chunk,
                    select, temperature, deadline_s)
        self._policy_samples = whole("policy_samples", renamed(
            self.name, "policy_samples", policy_samples, 8, num_samples=num_samples))
        Strategy.__init__(self, n=self.n, policy_samples=self._policy_samples, decimals=decimals, chunk=chunk,
                          select=select, temperature=temperature, deadline_s=deadline_s, published=published,
                          tokenizer=tokenizer)

    @property
    def policy_samples(self) -> int:
        return self._policy_samples

    def candidates(self, ctx: SearchContext, state: State, samples: torch.Tensor,
                   valid: torch.Tensor | None) -> tuple[Candidates, torch.Tensor]:
        b = samples.shape[0]
        first = torch.arange(b)  # round 0: the first sample of every observation, whose stream draws the noise
        noise = state.streams.select(first, fork_duplicates=False).randn((self.n, *samples.shape[2:]))
        tokenizer = self.tokenizer
        if tokenizer is None and self.published:
            tokenizer = getattr(getattr(ctx.process, "policy", None), "tokenizer", None)
        cands = GaussianAugmenter(ctx.process.space, self.decimals, self.published, tokenizer)(samples, noise, valid)
        return cands, first[:, None].expand(b, self.n)
