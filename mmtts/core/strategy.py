"""Strategies and the context they run in.

A strategy is written once against :class:`SearchContext`, which is the only
door to the process and the verifier: every model forward, decode and
verifier evaluation goes through it, so the budget is counted and enforced in
one place, scores are validated, the trace is recorded, and held-out verifiers
stay out of the strategy's reach.

The deadline (``Budget.max_seconds``) is enforced here too, for every strategy
alike: the context refuses the first model step past it and the search ends
with the best candidate finished so far (see :func:`run_strategy`).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch

from .batch import batch_size, concat, take, to_cpu
from .budget import Budget, Meter
from .errors import BudgetError, MmttsError, ProcessError
from .process import Process
from .result import Result, load_checkpoint, save_checkpoint
from .rng import Streams, StrategyRNG
from .settings import check_keywords
from .state import State
from .verifier import Verifier, as_verifier


@dataclass
class Selection:
    """What a strategy returns: chosen outputs best first, their scores, and optional extras.

    Args:
        outputs: the chosen outputs, best first.
        scores: their search-verifier scores.
        state: their states (for lineage and held-out context), when the strategy has them.
        population: the final population's outputs, for strategies that keep one.
        population_scores: their scores.
        extra: strategy-specific facts for the result (sizes, ESS trace, ...).
        votes: a voting strategy's share of candidates behind each chosen output (its ``scores`` are then NaN).
    """

    outputs: Any
    scores: torch.Tensor
    state: State | None = None
    population: Any = None
    population_scores: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)
    votes: torch.Tensor | None = None


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best scores, best first; ties keep the earlier candidate (stable)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k]


def merge_top(best: dict | None, out, s: torch.Tensor, state: State | None, keep: int) -> dict:
    """The top ``keep`` of the finished candidates kept so far (``best``) and a new finished batch."""
    if best is not None:
        out = concat([best["outputs"], out])
        s = torch.cat([best["scores"], s])
        state = None if state is None or best["state"] is None else State.cat([best["state"], state])
    idx = top_k(s, keep)
    return {"outputs": take(out, idx), "scores": s[idx], "state": None if state is None else state.select(idx)}


#: the largest population a strategy sizes from the budget by itself (``n=None``): past it, pass the size
AUTO_POPULATION_LIMIT = 1 << 16


class _DeadlineReached(Exception):
    """Raised by the context instead of a model step past the deadline; :func:`run_strategy` catches it."""


class SearchContext:
    """The process, verifier, budget meter, random stream, trace and checkpoints of one run.

    Args:
        process: the generative process searched.
        verifier: the search verifier (None when a strategy votes and scores nothing).
        budget: the caps; the context counts against them with its own :class:`~mmtts.core.budget.Meter`
            (``ctx.meter``), so the Budget object itself is never changed.
        seed: the root seed of every candidate stream and of the strategy's own stream.
        strategy: the strategy's registry name (checkpoint identity).
        settings: the strategy's settings (checkpoint identity; ``keep`` sizes what the deadline returns).
        checkpoint: a file to write resumable points to.
        resume: continue from ``checkpoint`` when it exists.
        on_checkpoint: called with the number of checkpoints written after each one.
        meter: the meter to count with (default: a new :class:`~mmtts.core.budget.Meter` of ``budget``; a sharded
            search passes one whose clock is rank 0's).
    """

    def __init__(self, process: Process, verifier: Verifier | None, budget: Budget, seed: int,
                 strategy: str = "", settings: Mapping | None = None,
                 checkpoint: str | os.PathLike | None = None, resume: bool = False,
                 on_checkpoint: Callable[[int], None] | None = None, meter: Meter | None = None):
        self.process = process
        self.verifier = verifier
        self.budget = Budget.coerce(budget)
        self.meter = meter if meter is not None else Meter(self.budget)
        self.seed = _check_seed(seed)
        self.rng = StrategyRNG(self.seed)
        self.trace: list[dict] = []
        self.next_index = 0
        self.best_so_far = float("-inf")
        self.checkpoint_path = Path(checkpoint) if checkpoint is not None else None
        self.on_checkpoint = on_checkpoint
        self.checkpoints_written = 0
        self.restored: dict | None = None
        self._identity = {"strategy": strategy, "settings": dict(settings or {}), "seed": self.seed,
                          "caps": list(self.budget.caps())}
        # with a deadline the context keeps what the search would return if it struck: the best finished
        # candidates, and the latest preview score of each candidate id (to pick one to finish if none has)
        self._deadline = self.budget.max_seconds
        self._keep = int((settings or {}).get("keep") or 1)
        self._finished: dict | None = None
        self._preview_scores: dict[int, float] = {}
        self._stepping: State | None = None
        self._past_deadline = False  # finishing the one candidate the deadline returns
        if resume:
            if self.checkpoint_path is None:
                raise MmttsError("resume=True needs checkpoint=PATH, the file to resume from")
            if self.checkpoint_path.exists():
                self._restore(load_checkpoint(self.checkpoint_path, device="cpu"))
        self.meter.start()

    # -- checkpoints ---------------------------------------------------------------
    def _restore(self, ck: dict) -> None:
        if ck["identity"] != _jsonable(self._identity):
            raise MmttsError(
                f"checkpoint {self.checkpoint_path} was written by a different run "
                f"({ck['identity']}), not {self._identity}; delete it or pass the same settings"
            )
        self.meter.load_state_dict(ck["budget"])
        self.rng = StrategyRNG.from_state_dict(ck["rng"])
        self.trace = ck["trace"]
        self.next_index = ck["next_index"]
        self.best_so_far = ck["best_so_far"]
        self.restored = ck["payload"]

    def checkpoint(self, payload: dict) -> None:
        """Record a resumable point: the strategy's loop state plus the context's own."""
        if self.checkpoint_path is None:
            return
        save_checkpoint(self.checkpoint_path, {
            "identity": _jsonable(self._identity),
            "budget": self.meter.state_dict(),
            "rng": self.rng.state_dict(),
            "trace": self.trace,
            "next_index": self.next_index,
            "best_so_far": self.best_so_far,
            "payload": payload,
        })
        self.checkpoints_written += 1
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.checkpoints_written)

    # -- the process, metered ------------------------------------------------------
    def fresh(self, n: int) -> State:
        """``n`` new candidates; candidate i of a run always gets the same stream."""
        if n < 1:
            raise ValueError(f"cannot start {n} candidates; n must be at least 1")
        streams = Streams.spawn(self.seed, n, start=self.next_index)
        first = self.next_index
        self.next_index += n
        with self.meter.timer("model"):
            state = self.process.init(streams, first_index=first)
        return self._checked_state(state, n, "init", f"a State of {n} candidates, one per stream", of="streams")

    def step(self, state: State) -> State:
        if bool(self.process.is_done(state).any()):
            raise MmttsError("cannot step candidates that already completed every stage")
        return self._step(state)

    def _step(self, state: State) -> State:
        """:meth:`step` for candidates known not to be done."""
        p = self.process
        # a process with one cost for every stage (the default stage_nfe) costs that per candidate
        cost = int(p.nfe_per_stage) * len(state) if type(p).stage_nfe is Process.stage_nfe \
            else int(p.stage_nfe(state.stage).sum())
        m = self.meter
        if not m.can_afford(nfe=cost):
            m.check_affordable(f"stepping {len(state)} candidates", nfe=cost)
        if self._deadline is not None and not self._past_deadline and m.elapsed >= self._deadline:
            self._stepping = state
            raise _DeadlineReached
        with m.timer("model"):
            new = p.step(state)
        self._checked_state(new, len(state), "step", "a State with the same candidates, one stage further")
        m.charge(nfe=cost)
        return new

    def perturb(self, state: State, scale) -> State:
        """The process's :meth:`~mmtts.core.process.Process.perturb` of ``state``, on the model clock.

        Like the noise a stochastic step draws, a mutation's noise and its
        mixing into the latents are the process's sampling work: every process
        operation that makes or moves latents (init, step, perturb, renoise)
        runs on the model clock, so a method's overhead is the search's own
        bookkeeping whichever of them it uses.
        """
        with self.meter.timer("model"):
            out = self.process.perturb(state, scale)
        return self._checked_state(out, len(state), "perturb", "a State with the same candidates")

    def renoise(self, state: State, stages: int) -> State:
        """The process's :meth:`~mmtts.core.process.Process.renoise` of ``state`` by ``stages``, on the model
        clock (see :meth:`perturb`)."""
        with self.meter.timer("model"):
            out = self.process.renoise(state, stages)
        return self._checked_state(out, len(state), "renoise", "a State with the same candidates")

    def _checked_state(self, out, n: int, method: str, must: str, of: str = "candidates") -> State:
        """``out`` when the process's ``method`` returned a State of ``n`` candidates, else a ProcessError
        saying what it must return."""
        if not isinstance(out, State) or len(out) != n:
            got = f"{len(out)} candidates" if isinstance(out, State) else f"a {type(out).__name__}"
            raise ProcessError(f"{self._process_name()}.{method}() returned {got} for {n} {of}; it must return "
                               f"{must}")
        return out

    def advance(self, state: State, stages: int | None = None) -> State:
        """Step ``stages`` times (default: until every candidate is done)."""
        p = self.process
        plain = type(p).is_done is Process.is_done  # done means stage >= num_stages: read the stages once
        k = 0
        while stages is None or k < stages:
            if plain:
                at = state.stage.tolist()
                every, some = (min(at) >= p.num_stages, max(at) >= p.num_stages) if at else (True, False)
            else:
                done = p.is_done(state)
                every, some = bool(done.all()), bool(done.any())
            if every:
                break
            if some:
                raise MmttsError("cannot step candidates that already completed every stage")
            state = self._step(state)
            k += 1
        return state

    def preview(self, state: State) -> Any:
        with self.meter.timer("decode"):
            out = self.process.preview(state)
        self._check_batch(out, len(state), "preview")
        if self.process.decodes_on_preview:
            self.meter.charge(decodes=len(state))
        return out

    def finish(self, state: State) -> Any:
        if not bool(self.process.is_done(state).all()):
            raise MmttsError("finish() needs every candidate to have completed all stages")
        with self.meter.timer("decode"):
            out = self.process.finish(state)
        self._check_batch(out, len(state), "finish")
        if self.process.decodes_on_finish:
            self.meter.charge(decodes=len(state))
        return out

    def _process_name(self) -> str:
        return type(self.process).__name__

    def _check_batch(self, out: Any, n: int, method: str) -> None:
        """A process's outputs must hold one item per candidate: refuse them before anything is scored or charged."""
        try:
            got = batch_size(out)
        except (TypeError, ValueError) as e:
            raise ProcessError(f"{self._process_name()}.{method}() returned an output batch mmtts cannot read "
                               f"({e}); return a tensor, list or dict with the {n} candidates on dimension 0") from None
        if got != n:
            raise ProcessError(f"{self._process_name()}.{method}() returned {got} output(s) for {n} candidates; it "
                               f"must return one output per candidate, in order")

    def score(self, outputs: Any, state: State | None = None, final: bool = True) -> torch.Tensor:
        """Score with the search verifier; ``final`` scores of finished candidates enter the trace."""
        if self.verifier is None:
            raise MmttsError(f"strategy {self._identity['strategy']!r} scores candidates with a verifier, and none "
                             "was given; pass one (a Verifier or a scoring function) as the verifier argument")
        try:
            n = batch_size(outputs)
        except (TypeError, ValueError) as e:
            raise MmttsError(f"cannot score outputs mmtts cannot read as a batch ({e}); pass a tensor, list or "
                             "dict with the candidates on dimension 0") from None
        m = self.meter
        if not m.can_afford(verifier_calls=n):
            m.check_affordable(f"scoring {n} candidates", verifier_calls=n)
        context = self.process.context(state) if state is not None else None
        before = self.verifier.evaluations
        with m.timer("verifier"):
            s = self.verifier(outputs, context)
        m.charge(verifier_calls=self.verifier.evaluations - before)
        if final and n:
            self.best_so_far = max(self.best_so_far, float(s.max()))
            self.trace.append({"nfe": m.nfe, "verifier_calls": m.verifier_calls,
                               "seconds": round(m.elapsed, 6), "best": self.best_so_far,
                               "scores": s.tolist()})
        if self._deadline is not None and n:
            if final:
                self._finished = merge_top(self._finished, outputs, s, state, self._keep)
            elif state is not None:
                self._preview_scores = dict(zip(state.ids.tolist(), s.tolist()))
        return s

    def candidates_affordable(self, verifier_calls_per_candidate: int = 1) -> int:
        """Complete candidates the remaining budget pays for (-1: no count cap, only time)."""
        return self.meter.capacity(self.process.nfe_per_candidate(), verifier_calls_per_candidate)

    def auto_population(self, n: int, setting: str) -> int:
        """``n`` candidates sized from the budget, refused past :data:`AUTO_POPULATION_LIMIT` (one batch of
        millions is a typo in a budget, not a search)."""
        if n > AUTO_POPULATION_LIMIT:
            raise BudgetError(f"{self._identity['strategy'] or 'the strategy'} would size one batch of {n} candidates "
                              f"from the budget ({self.budget.max_nfe} NFE, {self.budget.max_verifier_calls} "
                              f"verifier calls), past the {AUTO_POPULATION_LIMIT} it sizes by itself; pass {setting}= "
                              "explicitly or a smaller budget")
        return n

    def require_candidates(self, n: int, verifier_calls_per_candidate: int = 1) -> None:
        """Raise a clear error when the remaining budget cannot pay for ``n`` complete candidates."""
        self.meter.require_candidates(n, self.process.nfe_per_candidate(), verifier_calls_per_candidate)

    # -- the deadline ----------------------------------------------------------------
    def deadline_selection(self) -> Selection:
        """What the search returns when the deadline stopped it.

        The best ``keep`` candidates finished so far. When none has finished,
        the cheapest way to an answer: the candidate with the best latest
        preview score (the first one when none was scored) of the batch the
        deadline stopped is run alone to the end past the deadline, scored
        and returned.
        """
        self.meter.stopped = "deadline"
        self._past_deadline = True
        if self._finished is None:
            state = self._stepping
            ranked = torch.tensor([self._preview_scores.get(i, float("-inf")) for i in state.ids.tolist()],
                                  dtype=torch.float64)
            one = self.advance(state.select(top_k(ranked, 1)))
            out = self.finish(one)
            self.score(out, one)
        best = self._finished
        return Selection(outputs=best["outputs"], scores=best["scores"], state=best["state"])


class Strategy(ABC):
    """A search algorithm, written once against :class:`SearchContext`.

    Args:
        **settings: the strategy's settings (data, not code), validated by the subclass's ``__init__`` and
            recorded in the result and the checkpoint identity.
    """

    name: ClassVar[str] = ""

    def __new__(cls, *args, **settings):
        # a misspelt or unknown setting is refused here, for every strategy, with the valid settings listed
        check_keywords(cls, args, settings, owner=f"strategy {cls.name!r}" if cls.name else cls.__name__)
        return super().__new__(cls)

    def __init__(self, **settings):
        self._settings = settings

    @property
    def settings(self) -> dict:
        return dict(self._settings)

    @abstractmethod
    def run(self, ctx: SearchContext) -> Selection:
        """Search within ``ctx.budget`` (counted by ``ctx.meter``) and return the chosen candidates."""


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if x is None or isinstance(x, (int, float, str, bool)):
        return x
    return repr(x)


def run_strategy(strategy: Strategy, process: Process, verifier: Verifier | Callable | None, budget: Budget | int,
                 seed: int = 0, heldout: Mapping[str, Verifier | Callable] | Sequence[Verifier] | None = None,
                 checkpoint: str | os.PathLike | None = None, resume: bool = False,
                 on_checkpoint: Callable[[int], None] | None = None, distributed: bool = False) -> Result:
    """Run one strategy and score its choice with the held-out verifiers (``verifier`` None: a vote needs none).

    With ``distributed=True``, under ``accelerate launch``, the candidates'
    model and verifier work is split over the processes and every process
    returns the Result one process returns with the same seed (see
    :mod:`mmtts.distributed.search`).

    With ``Budget.max_seconds``, the first model step past the deadline is not
    taken: the search stops and returns the best candidates finished so far
    (or, when none has finished, one candidate run to the end, see
    :meth:`SearchContext.deadline_selection`), with ``Result.stopped`` and
    ``budget["stopped"]`` set to ``"deadline"``; the strategy's ``extra`` is then empty.
    """
    if not isinstance(process, Process):
        raise MmttsError(f"process must be an mmtts Process (a subclass of mmtts.Process), not "
                         f"{type(process).__name__}")
    verifier = as_verifier(verifier) if verifier is not None else None
    budget = Budget.coerce(budget)
    if budget.max_nfe is not None and budget.max_nfe < process.nfe_per_candidate():
        raise BudgetError(
            f"budget of {budget.max_nfe} NFE is below the cost of one candidate "
            f"({process.nfe_per_candidate()} NFE for {process.num_stages} stages); "
            f"raise the budget to at least {process.nfe_per_candidate()}"
        )
    held = _heldout_dict(heldout)
    if any(v is verifier for v in held.values()):
        raise MmttsError("a held-out verifier must not be the search verifier itself")
    meter = None
    if distributed:
        from ..distributed.search import shard_search
        process, verifier, meter = shard_search(process, verifier, budget, checkpoint)
    ctx = SearchContext(process, verifier, budget, seed, strategy=strategy.name, settings=strategy.settings,
                        checkpoint=checkpoint, resume=resume, on_checkpoint=on_checkpoint, meter=meter)
    try:
        sel = strategy.run(ctx)
    except _DeadlineReached:
        sel = ctx.deadline_selection()
    report = ctx.meter.report()  # the search ends here: held-out scoring below evaluates it, it is not part of it
    held_scores = {}
    for name, v in held.items():
        context = process.context(sel.state) if sel.state is not None else None
        held_scores[name] = v(sel.outputs, context)
    lineage = {}
    if sel.state is not None:
        lineage = {"ids": sel.state.ids.clone(), "parents": sel.state.parents.clone(),
                   "origin": sel.state.origin.clone()}
    return Result(
        outputs=to_cpu(sel.outputs), scores=sel.scores, heldout=held_scores, trace=ctx.trace,
        budget=report, strategy=strategy.name, settings=strategy.settings, seed=int(seed),
        lineage=lineage, population=to_cpu(sel.population), population_scores=sel.population_scores,
        extra=sel.extra, votes=sel.votes, stopped=ctx.meter.stopped,
    )


def _check_seed(seed) -> int:
    """A whole number in [0, 2**63); anything else would silently share another seed's run."""
    import numbers
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise MmttsError(f"seed must be a whole number in [0, 2**63), not {type(seed).__name__} {seed!r}; "
                         "pass e.g. seed=0")
    if not 0 <= int(seed) < 2 ** 63:
        raise MmttsError(f"seed={seed} is outside [0, 2**63); pass a seed in that range (distinct seeds in it "
                         "give distinct runs)")
    return int(seed)


def _heldout_dict(heldout) -> dict[str, Verifier]:
    if heldout is None:
        return {}
    if isinstance(heldout, Mapping):
        return {str(k): as_verifier(v, name=str(k)) for k, v in heldout.items()}
    out = {}
    for v in heldout:
        v = as_verifier(v)
        if v.name in out:
            raise MmttsError(f"two held-out verifiers share the name {v.name!r}; pass a dict to name them")
        out[v.name] = v
    return out
