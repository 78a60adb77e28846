"""Results of a search run and the checkpoint format a run resumes from."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .state import State

CHECKPOINT_VERSION = 1


@dataclass
class Result:
    """What a strategy chose, how it got there, and what it cost.

    ``outputs``/``scores`` are the chosen candidates (best first) and their
    search-verifier scores (NaN where no verifier scored an output, as for
    an answer aggregated by a vote); ``votes`` is, for a voting strategy,
    the share of candidates behind each chosen output (None otherwise);
    ``heldout`` maps each held-out verifier's name to
    its scores of the same outputs (computed after the search, never used to
    select). ``trace`` has one entry per scoring of finished candidates: the
    budget spent so far, the best score so far and all scores of that batch,
    which is what a scaling curve is drawn from. ``stopped`` says why the
    search ended before its strategy finished: ``"deadline"`` when the
    budget's ``max_seconds`` struck (the outputs are then the best candidates
    finished before the deadline), None when the strategy ran to its end.

    Attributes:
        outputs: the chosen candidates, best first.
        scores: their search-verifier scores.
        heldout: held-out verifier name -> its scores of ``outputs``.
        trace: one entry per scoring of finished candidates (budget, best score, batch scores).
        budget: the budget meter's report of what the search spent.
        strategy: the strategy's name.
        settings: the strategy's settings.
        seed: the seed of the run.
        lineage: ``ids``, ``parents`` and ``origin`` of the chosen candidates (empty without states).
        population: the final population's outputs, for strategies that keep one.
        population_scores: their scores.
        extra: strategy-specific facts (sizes, ESS trace, ...).
        votes: for a voting strategy, the share of candidates behind each output.
        stopped: ``"deadline"`` when the time limit ended the search, else None.
    """

    outputs: Any
    scores: torch.Tensor
    heldout: dict[str, torch.Tensor]
    trace: list[dict]
    budget: dict
    strategy: str
    settings: dict
    seed: int
    lineage: dict[str, torch.Tensor] = field(default_factory=dict)
    population: Any = None
    population_scores: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)
    votes: torch.Tensor | None = None
    stopped: str | None = None

    @property
    def deadline_hit(self) -> bool:
        """Whether the deadline stopped the search (``stopped == "deadline"``)."""
        return self.stopped == "deadline"

    @property
    def best_score(self) -> float:
        return float(self.scores[0])

    @property
    def best(self) -> Any:
        from .batch import take
        return take(self.outputs, [0])

    def curve(self) -> tuple[list[int], list[float]]:
        """(NFE spent, best final score so far) after each scoring of finished candidates."""
        return [e["nfe"] for e in self.trace], [e["best"] for e in self.trace]

    def summary(self) -> dict:
        """A JSON-ready summary (outputs left out)."""
        return {
            "strategy": self.strategy,
            "settings": self.settings,
            "seed": self.seed,
            "best_score": self.best_score,
            "scores": self.scores.tolist(),
            "votes": self.votes.tolist() if self.votes is not None else None,
            "heldout": {k: v.tolist() for k, v in self.heldout.items()},
            "budget": self.budget,
            "trace": [{k: v for k, v in e.items() if k != "scores"} for e in self.trace],
            "extra": self.extra,
            "stopped": self.stopped,
        }


def _pack(obj: Any) -> Any:
    """Make a payload loadable with ``torch.load(weights_only=True)``: States become tagged dicts."""
    if isinstance(obj, State):
        return {"__state__": obj.state_dict()}
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _pack(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_pack(v) for v in obj]
    if obj is None or isinstance(obj, (int, float, str, bool)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}; use tensors, numbers, strings, lists, dicts or States")


def _unpack(obj: Any, device) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__state__"}:
            return State.from_state_dict(obj["__state__"], device=device)
        return {k: _unpack(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, device) for v in obj]
    return obj


def save_checkpoint(path: str | os.PathLike, content: dict) -> None:
    """Write atomically, so an interrupted write never leaves a broken checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(_pack({"version": CHECKPOINT_VERSION, **content}), tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, device="cpu") -> dict:
    from .errors import MmttsError
    try:
        d = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: any unpickling error
        why = (str(e).strip().splitlines() or [""])[0][:160]
        raise MmttsError(f"checkpoint {path} cannot be read ({type(e).__name__}: {why}); delete it to start "
                         "afresh") from None
    if not isinstance(d, dict) or d.get("version") != CHECKPOINT_VERSION:
        version = d.get("version") if isinstance(d, dict) else None
        raise MmttsError(f"checkpoint {path} has format version {version}; this mmtts reads {CHECKPOINT_VERSION}: "
                         "delete it to start afresh")
    return _unpack(d, device)
