"""One search's candidates split over the processes of a group.

Every rank runs the same strategy on the same, whole population: the state is
replicated. Only the model work is sharded: :class:`ShardedProcess` runs
``init``/``step``/``preview``/``finish`` on this rank's contiguous slice of
the batch and gathers the results, and :class:`ShardedVerifier` scores this
rank's slice and gathers the scores. Because every candidate draws its noise
from its own counter-based stream, a candidate's step does not depend on which
rank runs it or beside whom, so each rank ends with exactly the population a
single process would hold; the strategy's own stream (resampling, tournaments)
is derived from the same seed on every rank, so every rank takes the same
decision, and ``select``/``resample`` simply re-index the replicated state
(copies move with their rank-agnostic streams). The budget is counted on the
whole population, so its counters are global and equal on every rank; with a
deadline, the clock is rank 0's (:class:`SharedClockMeter`), so every rank
stops at the same step.

Batches with fewer candidates than ranks run whole on every rank (no traffic).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..core.batch import batch_size, take
from ..core.budget import Budget, Meter
from ..core.errors import MmttsError
from ..core.process import Process
from ..core.rng import Streams
from ..core.state import State
from ..core.verifier import NonFiniteScoreWarning, Verifier
from .comm import Comm

#: where a verifier runs in a sharded search: each rank scores its slice, rank 0 scores all (its scores are
#: broadcast: an API-backed judge called once), or every rank scores all (verifiers that rank within a batch)
PLACEMENTS = ("shard", "rank0", "replicate")


def run_on_rank_zero(verifier: Verifier) -> Verifier:
    """Mark ``verifier`` to run on rank 0 only in a sharded search (its scores are broadcast); returns it."""
    verifier.placement = "rank0"
    return verifier


def _state_parts(state: State) -> dict:
    return {"data": dict(state.data), "stage": state.stage, "seeds": state.streams.seeds,
            "counters": state.streams.counters, "ids": state.ids, "parents": state.parents, "origin": state.origin}


def _from_parts(parts: dict, meta: dict) -> State:
    return State.unchecked(parts["data"], parts["stage"], Streams.unchecked(parts["seeds"], parts["counters"]),
                           parts["ids"], parts["parents"], parts["origin"], dict(meta))


class ShardedProcess(Process):
    """A process whose model work is split over the ranks of a group; everything else is the inner process's.

    ``init``, ``step``, ``preview`` and ``finish`` run on this rank's slice of
    the batch and return the whole gathered batch; costs, capabilities
    (``perturb``, ``renoise``, latents) and conditioning are the inner
    process's, applied to the replicated state.

    Args:
        process: the process to shard.
        comm: the group (default: the one ``accelerate launch`` started).
    """

    def __init__(self, process: Process, comm: Comm | None = None):
        if isinstance(process, ShardedProcess):
            raise MmttsError("the process is already sharded; pass the inner process")
        self.inner = process
        self.comm = comm or Comm()
        for name in ("num_stages", "nfe_per_stage", "latent_key", "decodes_on_preview", "decodes_on_finish",
                     "extent"):
            setattr(self, name, getattr(process, name))

    def __getattr__(self, name: str) -> Any:  # process-specific attributes (a GUI process's space, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # -- sharded model work ----------------------------------------------------------
    def _local(self, n: int) -> tuple[int, int] | None:
        return None if n < self.comm.world else self.comm.shard(n)

    def _gather_state(self, op: str, n: int, compute, whole: State | None = None) -> State:
        """The whole batch of ``compute(span)``, a State computed from this rank's slice ``[lo, hi)``.

        ``compute`` returns the output State and the local input State (None for ``init``). A process may
        advance its input's streams in place (``Streams.randn`` does) and return them shared with its
        output; the gathered counters are written back into the streams of ``whole``, the whole input, and
        shared again, so a strategy holding the input state sees what it sees in one process.
        """
        span = self._local(n)
        if span is None:
            return compute(None)[0]
        holder = {}

        def local():
            out, given = compute(span)
            holder["meta"], holder["shared"] = out.meta, given is not None and out.streams is given.streams
            parts = _state_parts(out)
            if given is not None:
                parts["given_counters"] = given.streams.counters
            return parts
        parts = self.comm.all_gather_batch(op, local)
        out = _from_parts(parts, holder["meta"])
        if "given_counters" in parts:
            streams = whole.streams
            streams.counters.copy_(parts["given_counters"])
            if holder["shared"]:
                out.streams = streams
        return out

    def init(self, streams: Streams, first_index: int = 0) -> State:
        def compute(span):
            if span is None:
                return self.inner.init(streams, first_index=first_index), None
            lo, hi = span
            return self.inner.init(streams.take(torch.arange(lo, hi)), first_index=first_index + lo), None
        return self._gather_state("init", len(streams), compute)

    def step(self, state: State) -> State:
        def compute(span):
            given = state if span is None else state.select(torch.arange(*span))
            return self.inner.step(given), given
        return self._gather_state("step", len(state), compute, whole=state)

    def _outputs(self, op: str, state: State, fn) -> Any:
        span = self._local(len(state))
        if span is None:
            return fn(state)
        return self.comm.all_gather_batch(op, lambda: fn(state.select(torch.arange(*span))))

    def preview(self, state: State) -> Any:
        return self._outputs("preview", state, self.inner.preview)

    def finish(self, state: State) -> Any:
        return self._outputs("finish", state, self.inner.finish)

    # -- the inner process's costs and capabilities ----------------------------------
    def stage_nfe(self, stage: torch.Tensor) -> torch.Tensor:
        return self.inner.stage_nfe(stage)

    def nfe_per_candidate(self) -> int:
        return self.inner.nfe_per_candidate()

    def context(self, state: State) -> Any:
        return self.inner.context(state)

    def is_done(self, state: State) -> torch.Tensor:
        return self.inner.is_done(state)

    def latent(self, state: State) -> torch.Tensor:
        return self.inner.latent(state)

    def with_latent(self, state: State, latent: torch.Tensor) -> State:
        return self.inner.with_latent(state, latent)

    def is_stochastic(self, stage: int) -> bool | None:
        return self.inner.is_stochastic(stage)

    def forks_diverge(self, stage: int) -> bool | None:
        return self.inner.forks_diverge(stage)

    def perturb(self, state: State, scale) -> State:
        return self.inner.perturb(state, scale)

    def renoise(self, state: State, stages: int) -> State:
        return self.inner.renoise(state, stages)

    def describe(self) -> dict:
        return {**self.inner.describe(), "sharded_over": self.comm.world}


class ShardedVerifier(Verifier):
    """A verifier run in a sharded search: on this rank's slice, on rank 0 only, or whole on every rank.

    Each call counts one evaluation per candidate of the whole batch (the
    global count), whichever rank scored it. Scores are validated once, on the
    gathered batch, as a single process validates them.

    Args:
        verifier: the verifier to run.
        comm: the group.
        placement: ``"shard"``, ``"rank0"`` or ``"replicate"`` (see :data:`PLACEMENTS`); default: the verifier's
            ``placement`` attribute, else ``"replicate"`` for a verifier that delegates to others (a mean rank
            depends on the whole batch) and ``"shard"`` otherwise.
    """

    def __init__(self, verifier: Verifier, comm: Comm, placement: str | None = None):
        super().__init__(nonfinite=verifier.nonfinite)
        placement = placement or getattr(verifier, "placement", None) or ("replicate" if verifier.parts else "shard")
        if placement not in PLACEMENTS:
            raise MmttsError(f"verifier placement {placement!r}; choose one of {PLACEMENTS}")
        self.inner, self.comm, self.placement = verifier, comm, placement
        self.name, self.cost = verifier.name, verifier.cost

    def score(self, outputs: Any, context: Any = None) -> torch.Tensor:
        n = batch_size(outputs)
        raw = lambda out, ctx: _raw_scores(self.inner, out, ctx)  # noqa: E731
        if self.placement == "rank0":
            return self.comm.broadcast_object("score", lambda: raw(outputs, context))
        if self.placement == "replicate" or n < self.comm.world:
            return raw(outputs, context)
        idx = torch.arange(*self.comm.shard(n))
        ctx = take(context, idx) if _is_batch(context, n) else context
        return self.comm.all_gather_batch("score", lambda: raw(take(outputs, idx), ctx))


def _raw_scores(verifier: Verifier, outputs: Any, context: Any) -> torch.Tensor:
    """The verifier's validated scores of ``outputs``, counted by the verifier itself, without its warning about
    non-finite scores (already at -inf; the gathered batch is checked, and warned about, once)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteScoreWarning)
        return verifier(outputs, context)


def _is_batch(context: Any, n: int) -> bool:
    try:
        return context is not None and batch_size(context) == n
    except (TypeError, ValueError):
        return False


class SharedClockMeter(Meter):
    """A meter whose clock is rank 0's, so that every rank of a sharded search meets a deadline at the same step.

    Each reading of :attr:`elapsed` is one broadcast from rank 0; every rank
    reads it at the same points of the search (before each model step when a
    deadline is set, and with each scored batch), so the trace's times are
    equal on every rank too.

    Args:
        budget: the caps this meter enforces.
        comm: the group.
    """

    def __init__(self, budget: Budget, comm: Comm):
        super().__init__(budget)
        self.comm = comm

    @property
    def elapsed(self) -> float:
        return self.comm.broadcast_object("clock", lambda: Meter.elapsed.fget(self))


def shard_search(process: Process, verifier: Verifier | None, budget: Budget, checkpoint) -> tuple:
    """The process, verifier and meter of a sharded search (``distributed=True``), with what it cannot do refused.

    The meter is None (the context's own) unless the budget has a deadline: then it is rank 0's clock.
    """
    if checkpoint is not None:
        raise MmttsError("distributed=True with checkpoint=... is not supported; run without a checkpoint")
    comm = Comm()
    meter = SharedClockMeter(budget, comm) if budget.max_seconds is not None and comm.world > 1 else None
    return (ShardedProcess(process, comm), None if verifier is None else ShardedVerifier(verifier, comm), meter)
