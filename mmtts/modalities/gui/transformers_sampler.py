"""Generating and scoring answers of a transformers model: K sequences per prompt, their tokens and log-probabilities.

:func:`generate_answers` draws K answers for one prompt in one batched
``generate()`` call (``num_return_sequences``), each row choosing its next
token with its own seed (:class:`~mmtts.modalities.gui.sampler.SeededTokenChoice`,
nucleus filtering with ``top_p``), or decodes greedily (``do_sample=False``)
at temperature 0. It returns the generated token ids with the mask of the
tokens that belong to each answer (up to its end-of-sequence token), which
:func:`sequence_logprobs` scores under the model with gradients: what
test-time RL (``gui-rcpo``) needs from any transformers causal LM or VLM.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from ...core.errors import MmttsError


@dataclass
class Generation:
    """K answers generated for one prompt.

    Attributes:
        inputs: the processor's inputs for the prompt (one row).
        tokens: (K, L) generated token ids (padding after an answer's end).
        mask: (K, L) True for the tokens of each answer, its end-of-sequence token included.
        texts: the K answers decoded, special tokens skipped.
    """

    inputs: dict
    tokens: torch.Tensor
    mask: torch.Tensor
    texts: list[str]


def check_generation_config(model) -> int:
    """The model's end-of-sequence id, or an error that says how to give the model a generation config."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        raise MmttsError(f"{type(model).__name__} has no generation config with an eos_token_id, so its answers "
                         "would never end; set model.generation_config = transformers.GenerationConfig("
                         "eos_token_id=..., pad_token_id=...) from its tokenizer")
    return int(eos[0] if isinstance(eos, (list, tuple)) else eos)


def check_image(image, model) -> None:
    """A screenshot must be a PIL image of positive size, or pixel values of the size the vision tower takes."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if min(image.size) <= 0:
            raise MmttsError(f"the screenshot is {image.size[0]}x{image.size[1]} pixels; pass a non-empty image")
        return
    if isinstance(image, torch.Tensor):
        side = getattr(getattr(getattr(model, "config", None), "vision_config", None), "image_size", None)
        if image.ndim != 3 or image.shape[0] != 3 or (side is not None and tuple(image.shape[1:]) != (side, side)):
            raise MmttsError(f"pixel values of shape {tuple(image.shape)} do not fit the vision tower, which takes "
                             f"(3, {side}, {side}); pass the PIL screenshot and let the processor resize it")
        return
    raise MmttsError(f"the screenshot must be a PIL image (or the processor's pixel values); got "
                     f"{type(image).__name__}")


def prompt_inputs(processor, image, text: str) -> dict:
    """The processor's inputs for one screenshot and prompt text; pixel values given as a (3, S, S) tensor are
    used as they are (the prompt's layout comes from a blank image of that size)."""
    from PIL import Image

    if isinstance(image, torch.Tensor):
        inputs = dict(processor(images=Image.new("RGB", tuple(image.shape[1:])), text=text, return_tensors="pt"))
        inputs["pixel_values"] = image[None].to(inputs["pixel_values"].dtype)
        return inputs
    return dict(processor(images=image, text=text, return_tensors="pt"))


def answer_mask(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """(K, L) True up to and including each row's first end-of-sequence token (every token when it has none)."""
    is_eos = tokens == eos
    before = torch.cumsum(is_eos.long(), 1) - is_eos.long()   # end tokens strictly before each position
    return before == 0


def shared_prompt(model, inputs: dict, k: int) -> dict:
    """``generate()`` inputs for k rows of one prompt whose cache is computed once: the model runs the prompt
    but its last token for one row, and the cache is repeated for the k rows (the same tokens, k times less work
    before the first answer token). For models whose positions do not depend on the image inputs past the
    first step (LLaVA, causal LMs)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {key: v for key, v in inputs.items() if key not in ("input_ids", "attention_mask")}
    cache = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True, **extra).cache
    cache.batch_repeat_interleave(k)
    return {"input_ids": ids.expand(k, -1), "attention_mask": mask.expand(k, -1), "cache": cache}


def generate_answers(model, processor, image, text: str, seeds: torch.Tensor, temperature: float,
                     top_p: float = 1.0, max_new_tokens: int = 32, share_prompt: bool = False) -> Generation:
    """K = len(seeds) answers to one prompt from one batched ``generate()`` call (greedy at temperature 0).

    ``share_prompt`` computes the prompt's cache once for all K rows (:func:`shared_prompt`)."""
    from transformers import LogitsProcessorList

    from .sampler import SeededTokenChoice, check_sampling

    seeds = check_sampling(seeds, temperature)
    if not 0 < top_p <= 1:
        raise MmttsError(f"top_p={top_p} must be in (0, 1] (1 keeps every token)")
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise MmttsError(f"max_new_tokens={max_new_tokens} must be a whole number >= 1")
    eos = check_generation_config(model)
    check_image(image, model)
    inputs = prompt_inputs(processor, image, text)
    k = len(seeds)
    with torch.no_grad():
        if temperature == 0:
            out = model.generate(**inputs, max_new_tokens=int(max_new_tokens), do_sample=False)
            out = out.expand(k, -1)
        else:
            # the processor leaves one finite logit per row, so the sampling step takes it whatever torch's RNG holds
            choice = LogitsProcessorList([SeededTokenChoice(seeds, temperature, top_p)])
            batch = shared_prompt(model, inputs, k) if share_prompt and k > 1 else \
                {**inputs, "num_return_sequences": k}
            with torch.random.fork_rng(devices=[]):  # generate's own draw leaves the caller's CPU RNG as it was
                out = model.generate(**batch, max_new_tokens=int(max_new_tokens), do_sample=True,
                                     temperature=1.0, top_k=0, top_p=1.0, logits_processor=choice)
    tokens = out[:, inputs["input_ids"].shape[1]:]
    texts = processor.batch_decode(tokens, skip_special_tokens=True)
    return Generation(inputs=inputs, tokens=tokens, mask=answer_mask(tokens, eos), texts=list(texts))


def sequence_logprobs(model, inputs: dict, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities (K, L) of the generated ``tokens`` under softmax(logits / T), one forward, with gradients.

    ``inputs`` are the prompt's processor inputs (one row); every answer is
    appended to it, so position i of an answer is scored with the prompt and
    the answer's tokens before i, as ``generate()`` produced it.
    """
    if not temperature > 0:
        raise MmttsError(f"temperature={temperature} must be > 0 to score sampled tokens")
    k, length = tokens.shape
    if k == 0 or length == 0:
        raise MmttsError(f"no tokens to score (shape {tuple(tokens.shape)}); generate at least one token per answer")
    prompt = inputs["input_ids"]
    ids = torch.cat([prompt.expand(k, -1), tokens.to(prompt.device)], 1)
    extra = {key: v.expand(k, *v.shape[1:]) for key, v in inputs.items()
             if key not in ("input_ids", "attention_mask") and isinstance(v, torch.Tensor)}
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits
    logits = logits[:, prompt.shape[1] - 1:-1].float() / float(temperature)
    return torch.log_softmax(logits, -1).gather(-1, ids[:, prompt.shape[1]:, None]).squeeze(-1)


def nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """``scores`` with every token outside the smallest set holding ``top_p`` of the probability set to -inf."""
    if top_p >= 1:
        return scores
    order = scores.argsort(1, descending=True)
    probs = torch.softmax(scores.gather(1, order), 1)
    outside = probs.cumsum(1) - probs >= top_p        # the mass before a token already reaches top_p
    drop = torch.zeros_like(outside).scatter(1, order, outside)
    return scores.masked_fill(drop, float("-inf"))
