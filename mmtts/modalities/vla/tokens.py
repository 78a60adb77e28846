"""Token policies: VLMs that emit actions as discretised tokens (OpenVLA-style), made to sample.

Such a policy reserves ``bins`` token ids, here the last ones of the
vocabulary, for uniform bins over each action dimension; decoding maps a token
back to its bin centre. Sampling N actions is N rows of one batched
autoregressive decode with a KV cache, restricted to the action tokens, each
step at ``temperature``. A token is drawn by inverting the cumulative
distribution at a uniform number from the candidate's own stream (one per
decoded token), so runs are seeded and a candidate's tokens do not depend on
the rows decoded beside it, unlike ``generate``, which draws from the global
generator.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import torch

from ...core.errors import MmttsError
from ...core.rng import Streams
from .policy import batch_rows
from .space import ActionSpace


class ActionTokenizer:
    """Uniform bins over each dimension of ``space``, mapped to the last ``bins`` ids of a vocabulary.

    Args:
        space: the :class:`ActionSpace` whose bounds are binned.
        bins: number of bins per dimension (from 2 to ``vocab_size``).
        vocab_size: size of the vocabulary whose last ``bins`` ids stand for the bins.
    """

    def __init__(self, space: ActionSpace, bins: int, vocab_size: int):
        if bins < 2 or bins > vocab_size:
            raise MmttsError(f"bins={bins} must be between 2 and the vocabulary size {vocab_size}")
        self.space, self.bins, self.vocab_size = space, int(bins), int(vocab_size)
        self.first_id = self.vocab_size - self.bins

    @property
    def token_ids(self) -> torch.Tensor:
        return torch.arange(self.first_id, self.vocab_size)

    def encode(self, actions: torch.Tensor) -> torch.Tensor:
        """Token ids of (..., D) actions: the bin each value falls in (values are clipped to the bounds first)."""
        lo, hi = self.space.bounds(actions.double())
        u = (self.space.clip(actions.double()) - lo) / (hi - lo)
        return self.first_id + torch.clamp((u * self.bins).long(), max=self.bins - 1)

    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Bin centres of (..., D) action token ids."""
        idx = token_ids.long() - self.first_id
        if (idx < 0).any() or (idx >= self.bins).any():
            raise MmttsError(f"token ids outside the action range [{self.first_id}, {self.vocab_size}) cannot be "
                             "decoded to actions")
        lo, hi = self.space.bounds(torch.zeros(1, dtype=torch.float64))
        return lo + (idx.double() + 0.5) * (hi - lo) / self.bins


class TokenActionPolicy:
    """Sample actions (or chunks of ``horizon``) from a transformers causal LM that emits action tokens.

    ``prompt(batch)`` turns a LeRobot-shaped batch into model inputs: a
    LongTensor of input ids (B, L) or a dict with ``input_ids`` and, if
    needed, ``attention_mask`` and image inputs such as ``pixel_values``
    (given to the first forward only). For a real checkpoint this is the
    model's processor applied to the images and instruction.

    Args:
        model: a causal LM whose vocabulary ends with the tokenizer's action bins.
        tokenizer: the :class:`ActionTokenizer` mapping tokens to actions.
        prompt: ``prompt(batch) -> input ids or model inputs``, one row per observation.
        temperature: sampling temperature over the action tokens (0 decodes greedily).
        horizon: actions per sample (a chunk of H actions, H * D tokens).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: ActionTokenizer,
                 prompt: Callable[[Mapping[str, Any]], torch.Tensor | dict], temperature: float = 1.0,
                 horizon: int = 1):
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is not None and vocab != tokenizer.vocab_size:
            raise MmttsError(f"the action tokenizer assumes a vocabulary of {tokenizer.vocab_size}; the model has "
                             f"{vocab}")
        if temperature < 0:
            raise MmttsError(f"temperature={temperature} must be >= 0 (0 decodes greedily)")
        self.model, self.tokenizer, self.prompt = model.eval(), tokenizer, prompt
        self.temperature, self.horizon = float(temperature), int(horizon)
        # transformers 5 renamed the KV-cache argument and output from past_key_values to cache
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @property
    def tokens_per_sample(self) -> int:
        return self.horizon * self.tokenizer.space.dim

    def _inputs(self, batch, n: int) -> dict:
        p = self.prompt(batch)
        inputs = {"input_ids": p} if isinstance(p, torch.Tensor) else dict(p)
        if "input_ids" not in inputs:
            raise MmttsError("prompt(batch) must return input ids (B, L) or a dict holding 'input_ids'")
        if n == 1:
            return inputs
        return {k: v.repeat_interleave(n, 0) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def draw_noise(self, streams: Streams, space) -> torch.Tensor:
        """One uniform number per decoded token and candidate: (M, H * D) float64."""
        return streams.rand((self.tokens_per_sample,))

    @torch.no_grad()
    def actions_from_noise(self, batch, noise):
        """Decode one sample per observation row, token t drawn at the uniform ``noise[:, t]``: (M, D) or (M, H, D)."""
        return self._decode(self._inputs(batch, 1), noise)

    @torch.no_grad()
    def sample_actions(self, batch, num_samples, generator):
        """``num_samples`` samples per observation (B, N, D) or (B, N, H, D), as one batch of B x N rows."""
        b = batch_rows(batch)
        u = torch.rand((b * num_samples, self.tokens_per_sample), generator=generator, dtype=torch.float64)
        out = self._decode(self._inputs(batch, num_samples), u)
        return out.reshape(b, num_samples, *out.shape[1:])

    def _decode(self, inputs: dict, uniforms: torch.Tensor) -> torch.Tensor:
        rows = inputs["input_ids"].shape[0]
        if uniforms.shape != (rows, self.tokens_per_sample):
            raise MmttsError(f"token sampling needs ({rows}, {self.tokens_per_sample}) uniform numbers, one per row "
                             f"and decoded token; got {tuple(uniforms.shape)}")
        allowed = self.tokenizer.token_ids.to(inputs["input_ids"].device)
        mask = inputs.get("attention_mask")
        d = self.tokenizer.space.dim
        picked, past = [], None
        for t in range(self.tokens_per_sample):
            out = self.model(**inputs, **{self._cache_arg: past}, use_cache=True)
            logits = out.logits[:, -1, allowed].double().cpu()
            if self.temperature == 0:
                choice = logits.argmax(1)
            else:  # inverse CDF: the first token whose cumulative probability exceeds the row's uniform number
                cdf = torch.softmax(logits / self.temperature, 1).cumsum(1)
                u = uniforms[:, t:t + 1].to(cdf.dtype) * cdf[:, -1:]
                choice = torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=allowed.numel() - 1)
            tok = allowed[choice.to(allowed.device)]
            picked.append(tok)
            past = out[self._cache_arg]
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            inputs = {"input_ids": tok[:, None], **({"attention_mask": mask} if mask is not None else {})}
        tokens = torch.stack(picked, 1).reshape(rows, self.horizon, d)
        actions = self.tokenizer.decode(tokens.cpu()).to(torch.get_default_dtype())
        return actions if self.horizon > 1 else actions[:, 0]
