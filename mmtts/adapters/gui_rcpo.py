"""GUI-RCPO: test-time reinforcement learning of a grounding policy from its own region consistency.

For every unlabeled prompt (a screenshot and an instruction) the policy
samples n clicks; each click's reward is its region consistency with the
group it was sampled in (votes inside its alpha-box over max vote times the
box area, :func:`mmtts.strategies.region_vote.region_rewards`). Advantages are
normalised within each prompt's group, GRPO style, and the update adds
beta times the KL divergence to the starting policy. Labels are never read:
the batch holds images, instructions, image sizes and prompt ids only.

Groups are formed by prompt id, whatever the batch holds: several prompts
per batch, in any order, and rows that repeat a prompt id pool their
samples into one group. The published code assumes one prompt per batch.

``published=True`` computes the reward as the published training code does
(:func:`published_region_rewards`): edges truncated with ``int()``, and in
its UI-TARS branch every answer grown by ``point_expand_size`` pixels per
side, in its Qwen branch none (a click there is an empty box and earns 0).

Two kinds of policy share the adapter. A grid-cell policy
``model(images, tokens) -> logits (B, rows, cols)`` (as
:class:`mmtts.modalities.gui.model.GroundingNet`) has its distribution in
closed form, so its log-probabilities and the KL are exact. Any transformers
causal LM or VLM with ``generate()`` and its processor is a token policy:
for each prompt ``n`` answers are generated in one batched call, parsed in
the model's coordinate space (an unparseable answer is a missing vote,
reward 0), and scored by the log-probabilities of their tokens under the
current policy (one forward per prompt); the loss per token is
``-advantage * log p + beta * KL`` with the KL to the starting policy
estimated on the sampled tokens (k3: ``exp(r) - r - 1``, ``r = log p_ref -
log p``), averaged over each answer's tokens. LoRA adapters through
``peft`` are its default trainable parameters (the reference policy is the
model with its adapters disabled); ``trainable="full"`` fine-tunes every
parameter matched by ``include`` (the reference is the snapshot).
"""

from __future__ import annotations

import fnmatch
from functools import partial
from typing import Callable, Sequence

import numpy as np
import torch
from torch.func import functional_call

from ..core.adapter import Adapter
from ..core.errors import MmttsError
from ..core.registry import ADAPTERS
from ..core.rng import derive_seed
from ..core.settings import renamed
from ..modalities.gui.coords import CoordSpace
from ..modalities.gui.model import boxes_at, cells_to_unit
from ..strategies.region_vote import as_coords, consensus, region_rewards, vote_boxes, with_elements

#: the published reward's branches: how much an answer grows per side before it votes
BRANCHES = ("ui-tars", "qwen")


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean) / (std + eps) within each group of equal id; a group of equal rewards gets 0."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    groups = torch.as_tensor(groups).reshape(-1)
    if rewards.shape != groups.shape:
        raise MmttsError(f"{rewards.numel()} rewards for {groups.numel()} group ids; pass one id per sample")
    out = torch.zeros_like(rewards)
    for g in torch.unique(groups):
        m = groups == g
        r = rewards[m]
        out[m] = (r - r.mean()) / (r.std(unbiased=False) + eps)
    return out


def grouped_region_rewards(points: np.ndarray, groups: np.ndarray, sizes: dict, alpha: float,
                           boxes: np.ndarray | None = None) -> np.ndarray:
    """Region-consistency reward of each answer within the group of its prompt id (``sizes``: id -> (w, h)).

    Answers vote with ``boxes`` (n, 4) pixels when given (box answers), else with alpha-squares on the clicks;
    a row of ``boxes`` that is NaN (an answer that was a click) votes with its click's alpha-square."""
    votes = vote_boxes(points, boxes, alpha)
    return _per_group(votes, groups, sizes, published=False)


def published_region_rewards(points: np.ndarray, groups: np.ndarray, sizes: dict, alpha: float = 0.0,
                             boxes: np.ndarray | None = None, *, branch: str = "ui-tars",
                             point_expand_size: int = 100) -> np.ndarray:
    """GUI-RCPO's reward as the published training code computes it (``alpha`` is not used).

    Every answer is a box: a box answer itself, a click (x, y) the empty box
    (x, y, x, y). Each edge is truncated with ``int()``; the ``"ui-tars"``
    branch then moves x1, y1 out by ``point_expand_size`` pixels and x2, y2
    likewise, the ``"qwen"`` branch moves nothing (so clicks cast no vote and
    earn 0). The boxes vote with truncated edges (:func:`region_rewards` with
    ``published=True``), within the group of their prompt id.
    """
    if branch not in BRANCHES:
        raise MmttsError(f"branch={branch!r}; the published reward has the branches {', '.join(BRANCHES)}")
    grow = int(point_expand_size)
    if grow != point_expand_size or grow < 0:
        raise MmttsError(f"point_expand_size={point_expand_size!r} must be a whole number of pixels >= 0 "
                         "(the published reward grows answers by it per side)")
    p = as_coords(points, "points", 2)
    b = np.concatenate([p, p], 1)
    if boxes is not None:
        given = as_coords(boxes, "boxes", 4)
        if len(given) != len(b):
            raise MmttsError(f"points ({len(b)} rows) and boxes ({len(given)} rows) must hold one row per answer "
                             "each (NaN where an answer is a click)")
        use = np.isfinite(given).all(1)
        b[use] = given[use]
    b = np.trunc(b)
    if branch == "ui-tars":
        b += np.array([-grow, -grow, grow, grow], dtype=np.float64)
    return _per_group(b, groups, sizes, published=True)


def _per_group(votes: np.ndarray, groups: np.ndarray, sizes: dict, published: bool) -> np.ndarray:
    groups = np.asarray(groups).reshape(-1)
    if len(groups) != len(votes):
        raise MmttsError(f"{len(groups)} prompt ids for {len(votes)} answers; pass one id per answer")
    out = np.zeros(len(votes))
    for g in np.unique(groups):
        m = groups == g
        out[m] = region_rewards(votes[m], *sizes[g], published=published)
    return out


@ADAPTERS.register("gui-rcpo")
class GUIRCPO(Adapter):
    """Region-consistency policy optimisation at test time.

    With a grid-cell policy, ``adapter(batch)`` takes ``{"images": (B, 3, H, W),
    "tokens": (B, L), "sizes": (B, 2) original (width, height), "ids": (B,)
    prompt ids}``, returns the greedy clicks of the policy before the
    update, (B, 2) in pixels, and takes one GRPO step. With a transformers
    policy the batch is ``{"images": B screenshots (PIL), "instructions": B
    strings, "sizes", "ids"}`` and the returned clicks are each prompt's
    region vote over its ``n`` samples (NaN when none parsed): the answers
    GUI-RC gives, at no extra generation. A transformers batch may also hold
    ``"elements"``: per prompt, where its screenshot's UI elements are
    (:mod:`mmtts.modalities.gui.elements`, or None); each answer then votes,
    and is rewarded, with the box of the element under it (as ``region-vote``
    with ``snap=True``), answers on no known element as they are.

    Args:
        model: the policy: ``model(images, tokens) -> logits (B, rows, cols)`` with ``model.cells``, or a
            transformers model with ``generate()`` (then pass ``processor``).
        n: clicks sampled per prompt (a group; at least 2).
        temperature: sampling temperature of the clicks and of the KL's distributions.
        alpha: side in pixels of the square a click votes with.
        beta: weight of the KL divergence to the starting policy.
        lr: Adam learning rate.
        include: parameter-name globs that adapt (default: every parameter); only those are snapshotted and
            restored by ``reset()``.
        seed: root of the sampling seeds (one generator per update).
        episodic: reset after every batch.
        answers: "point", or "box" for a policy that gives boxes (``model.forward_with_boxes``, as
            :class:`~mmtts.modalities.gui.model.BoxGrounding`): each sampled click answers with the box under
            it, and the boxes vote (the box network gets no gradient from the update).
        reward: ``reward(points, groups, sizes, alpha) -> (N,)`` replaces the region-consistency reward
            (default :func:`grouped_region_rewards`): ``points`` (N, 2) pixels, ``groups`` (N,) prompt ids,
            ``sizes`` a dict id -> (width, height); with box answers it is also passed ``boxes=`` (N, 4)
            pixels. It must give one finite number per click; a reward that reads labels makes this
            supervised RL, which is how the update itself is checked.
        published: compute the reward as the published training code does
            (:func:`published_region_rewards`; ``alpha`` is then unused). docs/gui.md lists the differences.
        branch: with ``published``, the published reward's branch: "ui-tars" (answers grown by
            ``point_expand_size`` per side) or "qwen" (no growth; clicks earn 0).
        point_expand_size: with ``published``, pixels the "ui-tars" branch adds to every side of an answer.
        processor: a transformers policy's processor (screenshot and text in, model inputs out).
        space: a transformers policy's answer space ('permille', 'pixel', 'unit', 'resized:WxH').
        prompt: a transformers policy's prompt, formatted with ``{instruction}`` (holding its image placeholder).
        max_new_tokens: the longest answer a transformers policy generates.
        trainable: a transformers policy's trainable parameters: "lora" (adapters added through ``peft``;
            ``include`` defaults to them) or "full" (``include`` defaults to every parameter).
        lora: keyword arguments of ``peft.LoraConfig`` (default: rank 8, alpha 16, no dropout, on the
            attention projections ``q_proj`` and ``v_proj``).
        samples: deprecated spelling of ``n``.
    """

    needs_norm_layers = False

    def __init__(self, model: torch.nn.Module, *, n: int | None = None, temperature: float = 1.0,
                 alpha: float = 50.0, beta: float = 0.04, lr: float = 1e-4, include: Sequence[str] | None = None,
                 seed: int = 0, episodic: bool = False, answers: str = "point",
                 reward: Callable[..., np.ndarray] | None = None, published: bool = False,
                 branch: str = "ui-tars", point_expand_size: int = 100, processor=None,
                 space: CoordSpace | str = "permille", prompt: str = "{instruction}", max_new_tokens: int = 32,
                 trainable: str = "lora", lora: dict | None = None, samples: int | None = None):
        n = renamed("gui-rcpo", "n", n, samples=samples)
        n = 16 if n is None else n
        if int(n) != n or n < 2:
            raise MmttsError(f"GUI-RCPO needs n >= 2 clicks per prompt to form a group (got n = {n})")
        if not temperature > 0 or not alpha > 0 or beta < 0 or not lr > 0:
            raise MmttsError(f"need temperature > 0, alpha > 0, beta >= 0 and lr > 0; got temperature={temperature}, "
                             f"alpha={alpha}, beta={beta}, lr={lr}")
        self.n, self.temperature, self.alpha, self.beta, self.lr = int(n), float(temperature), \
            float(alpha), float(beta), float(lr)
        if answers not in ("point", "box"):
            raise MmttsError(f"answers={answers!r}; choose 'point' or 'box'")
        if answers == "box" and not getattr(model, "has_boxes", False):
            raise MmttsError(f"answers='box' needs a policy that gives boxes (has_boxes and forward_with_boxes, "
                             f"as BoxGrounding); {type(model).__name__} has none")
        self.answers = answers
        self.tokens = hasattr(model, "generate")
        if self.tokens:
            model, include = self._token_policy(model, processor, space, prompt, max_new_tokens, trainable, lora,
                                                include)
        self.patterns = list(include) if include else ["*"]
        self.seed, self.updates = int(seed), 0
        if published and reward is not None:
            raise MmttsError("published=True sets the reward; pass either reward= or published=True")
        if published:
            published_region_rewards(np.zeros((1, 2)), np.zeros(1), {0: (1, 1)}, branch=branch,
                                     point_expand_size=point_expand_size)  # refuses a bad branch or size now
            reward = partial(published_region_rewards, branch=branch, point_expand_size=point_expand_size)
        self.published = bool(published)
        self.reward = grouped_region_rewards if reward is None else reward
        super().__init__(model, norm_kinds=(), episodic=episodic)

    def _token_policy(self, model, processor, space, prompt, max_new_tokens, trainable, lora, include):
        """Check a transformers policy's settings and add its LoRA adapters; returns the model and ``include``."""
        from ..modalities.gui.transformers_sampler import check_generation_config

        if processor is None:
            raise MmttsError(f"{type(model).__name__} is a transformers policy: pass its processor= (screenshot and "
                             "text in, model inputs out)")
        if self.answers != "point":
            raise MmttsError("answers='box' is for grid-cell policies with a box network; a transformers policy "
                             "answers with whatever it writes (points or boxes), parsed in its space")
        if trainable not in ("lora", "full"):
            raise MmttsError(f"trainable={trainable!r}; choose 'lora' (adapters through peft) or 'full'")
        if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise MmttsError(f"max_new_tokens={max_new_tokens} must be a whole number >= 1")
        check_generation_config(model)
        self.processor, self.space, self.prompt = processor, CoordSpace.parse(space), str(prompt)
        self.max_new_tokens, self.trainable = int(max_new_tokens), trainable
        if trainable == "full":
            return model, include
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise MmttsError("trainable='lora' needs the peft package (pip install peft); or pass "
                             "trainable='full' to fine-tune the model's own parameters") from None
        settings = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                    **(lora or {})}
        return get_peft_model(model, LoraConfig(**settings)), include or ["*lora_*"]

    def configure_model(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)

    def collect_params(self):
        params = [(n, p) for n, p in self.model.named_parameters()
                  if any(fnmatch.fnmatchcase(n, pat) for pat in self.patterns)]
        if not params:
            raise MmttsError(f"include={self.patterns} matches no parameter of {type(self.model).__name__}")
        for _, p in params:
            p.requires_grad_(True)
        return params

    def build_optimizer(self, params):
        return torch.optim.Adam(params, lr=self.lr)

    def extra_state(self) -> dict:
        return {"updates": self.updates}

    def load_extra(self, state: dict) -> None:
        self.updates = state["updates"]

    def _check(self, batch: dict):
        keys = ("images", "instructions", "sizes", "ids") if self.tokens else ("images", "tokens", "sizes", "ids")
        missing = [k for k in keys if k not in batch]
        if missing:
            raise MmttsError(f"GUI-RCPO batch lacks {missing}; it needs {', '.join(keys)} (no labels)")
        b = len(batch["ids"])
        if b == 0:
            raise MmttsError("GUI-RCPO got an empty batch; pass at least one prompt")
        for k in keys[:3]:
            if len(batch[k]) != b:
                raise MmttsError(f"batch[{k!r}] has {len(batch[k])} rows for {b} prompt ids")

    def _rewards(self, points: np.ndarray, groups: np.ndarray, size_of: dict, **extra) -> torch.Tensor:
        rewards = torch.as_tensor(np.asarray(self.reward(points, groups, size_of, self.alpha, **extra),
                                             dtype=np.float64))
        if rewards.shape != (len(points),) or not torch.isfinite(rewards).all():
            raise MmttsError(f"the GUI-RCPO reward must give one finite number per click: {len(points)} clicks, "
                             f"got shape {tuple(rewards.shape)} with {int((~torch.isfinite(rewards)).sum())} "
                             "non-finite; fix the reward function")
        return rewards

    def forward_and_adapt(self, batch: dict) -> torch.Tensor:
        self._check(batch)
        if self.tokens:
            return self._adapt_tokens(batch)
        if batch.get("elements") is not None:
            raise MmttsError("batch['elements'] (snapping answers to UI elements) is for transformers policies; a "
                             "grid-cell policy with box answers already votes with the boxes of its elements")
        images, tokens = batch["images"], batch["tokens"]
        sizes = torch.as_tensor(batch["sizes"], dtype=torch.float64)
        ids = torch.as_tensor(batch["ids"]).reshape(-1)
        if self.answers == "box":
            logits, extents = self.model.forward_with_boxes(images, tokens)
            logits = logits.flatten(1)
        else:
            logits, extents = self.model(images, tokens).flatten(1), None
        grid = cell_grid(self.model, logits)
        greedy = cells_to_unit(logits.argmax(1).detach(), None, grid) * sizes
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.updates))
        logp = torch.log_softmax(logits / self.temperature, 1)
        cells = torch.multinomial(logp.detach().exp(), self.n, replacement=True, generator=g)  # (B, K)
        jitter = torch.rand(*cells.shape, 2, generator=g, dtype=torch.float64)
        points = (cells_to_unit(cells, jitter, grid) * sizes[:, None]).reshape(-1, 2).numpy()
        groups = ids.repeat_interleave(self.n).numpy()
        size_of = {int(i): tuple(int(v) for v in s) for i, s in zip(ids.tolist(), sizes.tolist())}
        extra = {}
        if extents is not None:
            scale = torch.cat([sizes, sizes], 1)[:, None]                                  # (B, 1, 4)
            extra["boxes"] = (boxes_at(extents.detach(), cells) * scale).reshape(-1, 4).numpy()
        rewards = self._rewards(points, groups, size_of, **extra)
        adv = group_advantages(rewards, torch.from_numpy(groups)).float().reshape(cells.shape)
        pg = -(adv * logp.gather(1, cells)).mean()
        loss = pg
        if self.beta > 0:
            with torch.no_grad():
                ref = functional_call(self.model, self._snapshot["params"], (images, tokens)).flatten(1)
            ref_logp = torch.log_softmax(ref / self.temperature, 1)
            loss = loss + self.beta * (logp.exp() * (logp - ref_logp)).sum(1).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.updates += 1
        self.last = {"reward": float(rewards.mean()), "loss": float(loss.detach())}
        return greedy


    def _adapt_tokens(self, batch: dict) -> torch.Tensor:
        """One GRPO step of a transformers policy on a batch of prompts (see the module's docstring)."""
        from ..modalities.gui.parse import parse_answers
        from ..modalities.gui.transformers_sampler import generate_answers, sequence_logprobs

        sizes = torch.as_tensor(np.asarray(batch["sizes"], dtype=np.float64))
        if sizes.ndim != 2 or sizes.shape[1] != 2 or not (sizes > 0).all():
            raise MmttsError(f"batch['sizes'] must be (B, 2) positive (width, height) of the screenshots; got "
                             f"{tuple(sizes.shape)}")
        ids = torch.as_tensor(batch["ids"]).reshape(-1)
        size_of = {int(i): tuple(int(v) for v in s) for i, s in zip(ids.tolist(), sizes.tolist())}
        gens, points, boxes = [], [], []
        for b, (image, instruction) in enumerate(zip(batch["images"], batch["instructions"])):
            seeds = [derive_seed(self.seed, self.updates, b, j) for j in range(self.n)]
            g = generate_answers(self.model, self.processor, image, self.prompt.format(instruction=instruction),
                                 seeds, self.temperature, 1.0, self.max_new_tokens)
            p = parse_answers(g.texts, self.space, size_of[int(ids[b])])
            gens.append(g)
            points.append(p.points)
            boxes.append(p.boxes)
        if batch.get("elements") is not None:
            boxes = self._snapped(batch["elements"], points, boxes)
        points, boxes = np.concatenate(points), np.concatenate(boxes)
        groups = ids.repeat_interleave(self.n).numpy()
        extra = {"boxes": boxes} if np.isfinite(boxes).all(1).any() else {}
        rewards = self._rewards(points, groups, size_of, **extra)
        adv = group_advantages(rewards, torch.from_numpy(groups)).float().reshape(len(gens), self.n)
        self.optimizer.zero_grad()
        total, kl_sum = 0.0, 0.0
        for g, a in zip(gens, adv):
            logp = sequence_logprobs(self.model, g.inputs, g.tokens, self.temperature)
            mask = g.mask.to(logp.dtype)
            per_token = -a[:, None] * logp
            if self.beta > 0:
                with torch.no_grad():
                    ref = self._reference_logprobs(g)
                r = ref - logp
                kl = r.exp() - r - 1
                per_token = per_token + self.beta * kl
                kl_sum += float((kl.detach() * mask).sum() / mask.sum().clamp_min(1))
            loss = ((per_token * mask).sum(1) / mask.sum(1).clamp_min(1)).sum() / (len(gens) * self.n)
            loss.backward()
            total += float(loss.detach())
        self.optimizer.step()
        self.updates += 1
        self.last = {"reward": float(rewards.mean()), "loss": total, "kl": kl_sum / len(gens),
                     "parsed": float(np.isfinite(points).all(1).mean())}
        votes = np.full((len(gens), 2), np.nan)
        for b in range(len(gens)):
            rows = slice(b * self.n, (b + 1) * self.n)
            c = consensus(vote_boxes(points[rows], boxes[rows], self.alpha), *size_of[int(ids[b])])
            if c.point is not None:
                votes[b] = c.point
        return torch.from_numpy(votes)

    @staticmethod
    def _snapped(elements, points: list, boxes: list) -> list:
        """Each prompt's answer boxes with the element under each answer in place of its own box, where known."""
        from ..modalities.gui.elements import ElementProposals

        if len(elements) != len(points):
            raise MmttsError(f"batch['elements'] has {len(elements)} entries for {len(points)} prompts; give one "
                             "(or None) per prompt")
        out = []
        for el, p, b in zip(elements, points, boxes):
            if el is None:
                out.append(b)
                continue
            if not isinstance(el, ElementProposals):
                raise MmttsError(f"batch['elements'] holds a {type(el).__name__}; give ElementProposals (an "
                                 "ElementList of boxes or DetectedElements) or None per prompt")
            out.append(with_elements(b, el.boxes_at(p)))
        return out

    def _reference_logprobs(self, g) -> torch.Tensor:
        """Log-probabilities of a generation's tokens under the starting policy."""
        from ..modalities.gui.transformers_sampler import sequence_logprobs

        if self.trainable == "lora":
            with self.model.disable_adapter():
                return sequence_logprobs(self.model, g.inputs, g.tokens, self.temperature)
        start = self._snapshot["params"]
        return sequence_logprobs(lambda **kw: functional_call(self.model, start, (), kw), g.inputs, g.tokens,
                                 self.temperature)


def cell_grid(model, logits: torch.Tensor) -> tuple[int, int]:
    """The (columns, rows) of the policy's cell grid, from the model's ``cells`` attribute."""
    cells = getattr(model, "cells", None)
    if cells is None or cells[0] * cells[1] != logits.shape[1]:
        raise MmttsError(f"{type(model).__name__} must say its cell grid as model.cells = (columns, rows) "
                         f"matching its {logits.shape[1]} logits")
    return int(cells[0]), int(cells[1])
