"""A batch of candidates and what must follow each one when it is copied."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .rng import Streams, fork_keys, fork_values


@dataclass
class State:
    """A batch of partial candidates of a staged generative process.

    ``data`` holds the process's per-candidate tensors (latents, timestep
    indices, cached prompts, ...), each with the batch on dimension 0.
    ``stage`` is the number of stages each candidate has completed (candidates
    may sit at different stages, as in tree search). ``streams`` are their
    random streams; ``ids``, ``parents`` and ``origin`` record lineage:
    a unique id per candidate, the id it was copied from, and the index of the
    fresh candidate its line started from.

    Args:
        data: per-candidate tensors, the batch on dimension 0.
        stage: (B,) int64, stages completed by each candidate.
        streams: one random stream per candidate.
        ids: (B,) int64, a unique id per candidate.
        parents: (B,) int64, the id each candidate was copied from (-1 for a fresh one).
        origin: (B,) int64, the index of the fresh candidate each line started from.
        meta: batch-wide values a process keeps with its state (copied, not indexed).

    Copies come from :meth:`select`, :meth:`resample` and :meth:`cat`;
    :meth:`unchecked` builds a state from parts known to be valid, without checks.
    """

    data: dict[str, torch.Tensor]
    stage: torch.Tensor
    streams: Streams
    ids: torch.Tensor
    parents: torch.Tensor
    origin: torch.Tensor
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.streams)
        for name, t in {"stage": self.stage, "ids": self.ids, "parents": self.parents, "origin": self.origin}.items():
            if t.shape != (n,):
                raise ValueError(f"State.{name} has shape {tuple(t.shape)}; expected ({n},), one entry per candidate")
        for k, v in self.data.items():
            if not isinstance(v, torch.Tensor) or v.ndim == 0 or v.shape[0] != n:
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"State.data[{k!r}] has shape {shape}; every entry needs the batch ({n}) on dim 0")

    @classmethod
    def unchecked(cls, data: dict, stage: torch.Tensor, streams: Streams, ids: torch.Tensor, parents: torch.Tensor,
                  origin: torch.Tensor, meta: dict) -> "State":
        """A state over the given parts as they are: no checks and no copies.

        For parts known to be valid, such as gathers or concatenations of
        valid states, where the shapes hold by construction; a process building
        a state from new tensors uses the constructor, which checks them.
        """
        out = cls.__new__(cls)
        out.data, out.stage, out.streams, out.ids, out.parents, out.origin, out.meta = (
            data, stage, streams, ids, parents, origin, meta)
        return out

    @classmethod
    def fresh(cls, data: dict[str, torch.Tensor], streams: Streams, first_index: int = 0, meta: dict | None = None) -> "State":
        """A new batch of candidates at stage 0; ids are derived from the streams' seeds."""
        n = len(streams)
        origin = torch.arange(first_index, first_index + n, dtype=torch.int64)
        ids = streams.seeds.clone()
        return cls(
            data=dict(data),
            stage=torch.zeros(n, dtype=torch.int64),
            streams=streams,
            ids=ids,
            parents=torch.full((n,), -1, dtype=torch.int64),
            origin=origin,
            meta=dict(meta or {}),
        )

    def __len__(self) -> int:
        return len(self.streams)

    @property
    def device(self) -> torch.device:
        for v in self.data.values():
            return v.device
        return torch.device("cpu")

    def _gather(self, index, keys: list[int | None] | None) -> "State":
        """Candidates at ``index``; where ``keys[j]`` is not None, copy j is a forked child.

        A forked child's stream is forked (:meth:`Streams.take`), its id is
        derived from its parent's id the same way (:func:`~mmtts.core.rng.fork_values`)
        and its parent is the copied id.
        """
        if not (isinstance(index, torch.Tensor) and index.dtype == torch.int64 and index.ndim == 1 and index.is_cpu):
            index = torch.as_tensor(index, dtype=torch.int64).reshape(-1).cpu()
        n = len(self)
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= n):
            raise IndexError(f"candidate index out of range for a batch of {n}: {index.tolist()}")
        at = lambda t: t.index_select(0, index if t.is_cpu else index.to(t.device))  # noqa: E731
        ids, parents = at(self.ids), at(self.parents)
        forked = [j for j, k in enumerate(keys) if k is not None] if keys is not None else []
        streams = self.streams.take(index, keys)
        if forked:
            parents = parents.cpu()  # a copy on any other device; then a view
            parents.numpy()[forked] = ids.cpu().numpy()[forked]
            parents = parents.to(ids.device)
            if ids.device == streams.seeds.device and torch.equal(self.ids, self.streams.seeds):
                ids = streams.seeds.clone()  # ids that are the seeds fork to the forked seeds: derive them once
            else:
                ids = fork_values(ids, at(self.streams.counters), keys)
        return State.unchecked({k: at(v) for k, v in self.data.items()}, at(self.stage),
                               streams, ids, parents, at(self.origin), dict(self.meta))

    def select(self, index) -> "State":
        """Exact copies of the candidates at ``index`` (duplicates share their stream)."""
        return self._gather(index, None)

    def resample(self, index, fork_all: bool = False) -> "State":
        """Candidates at ``index``; a duplicate becomes a child with its own forked stream.

        The first copy of each candidate keeps its id and stream, so a
        candidate chosen once continues exactly as if nothing happened; with
        ``fork_all`` every copy is a new child (for offspring that must not
        replay the noise their parent already used).
        """
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1).cpu()
        return self._gather(index, fork_keys(index.tolist(), fork_all))

    @staticmethod
    def cat(states: Sequence["State"]) -> "State":
        if not states:
            raise ValueError("State.cat needs at least one state")
        keys = set(states[0].data)
        for s in states[1:]:
            if set(s.data) != keys:
                raise ValueError(f"cannot concatenate states with different fields: {sorted(keys)} vs {sorted(s.data)}")
        return State.unchecked(
            data={k: torch.cat([s.data[k] for s in states]) for k in states[0].data},
            stage=torch.cat([s.stage for s in states]),
            streams=Streams.cat([s.streams for s in states]),
            ids=torch.cat([s.ids for s in states]),
            parents=torch.cat([s.parents for s in states]),
            origin=torch.cat([s.origin for s in states]),
            meta=dict(states[0].meta),
        )

    def replace(self, **data: torch.Tensor) -> "State":
        """The same candidates with some data fields replaced (streams are shared, not copied)."""
        n = len(self.streams)
        for k, v in data.items():  # the other fields are valid already: check only what changes
            if not isinstance(v, torch.Tensor) or v.ndim == 0 or v.shape[0] != n:
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"State.data[{k!r}] has shape {shape}; every entry needs the batch ({n}) on dim 0")
        new = dict(self.data)
        new.update(data)
        return State.unchecked(new, self.stage, self.streams, self.ids, self.parents, self.origin, self.meta)

    def state_dict(self) -> dict:
        return {
            "data": {k: v.detach().cpu() for k, v in self.data.items()},
            "stage": self.stage,
            "streams": self.streams.state_dict(),
            "ids": self.ids,
            "parents": self.parents,
            "origin": self.origin,
            "meta": self.meta,
        }

    @classmethod
    def from_state_dict(cls, d: dict, device: torch.device | str = "cpu") -> "State":
        return cls(
            data={k: v.to(device) for k, v in d["data"].items()},
            stage=d["stage"],
            streams=Streams.from_state_dict(d["streams"]),
            ids=d["ids"],
            parents=d["parents"],
            origin=d["origin"],
            meta=dict(d.get("meta", {})),
        )
