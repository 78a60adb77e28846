"""A batch of candidates and what must follow each one when it is copied."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .rng import _PER_ITEM_BELOW, Streams, derive_seed, derive_seeds, fork_keys


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
    def _of(cls, data: dict, stage: torch.Tensor, streams: Streams, ids: torch.Tensor, parents: torch.Tensor,
            origin: torch.Tensor, meta: dict) -> "State":
        """A state built from parts of valid states (a gather or a concatenation): shapes hold by construction."""
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

    def _gather(self, index: torch.Tensor | None, fork: bool, fork_all: bool = False,
                keys: list[int | None] | None = None, positions: list[int] | None = None) -> "State":
        """Candidates at ``index``; with ``fork``, copy j is forked with ``keys[j]`` (default: :func:`fork_keys`).

        ``positions`` (a list of ints) may be given instead of ``index``.
        """
        if positions is not None:
            index = torch.tensor(positions, dtype=torch.int64)
        else:
            if not (isinstance(index, torch.Tensor) and index.dtype == torch.int64 and index.ndim == 1
                    and index.is_cpu):
                index = torch.as_tensor(index, dtype=torch.int64).reshape(-1).cpu()
            positions = index.tolist()
        n = len(self)
        if positions and (min(positions) < 0 or max(positions) >= n):
            raise IndexError(f"candidate index out of range for a batch of {n}: {positions}")
        if keys is None:
            keys = fork_keys(positions, fork_all) if fork else []
        m = sum(k is not None for k in keys)
        s, c, i, p = self.streams.seeds, self.streams.counters, self.ids, self.parents
        if i.is_cpu and p.is_cpu and self.stage.is_cpu and self.origin.is_cpu:
            # the per-candidate integers with numpy (copies by fancy indexing): a few small arrays, no dispatch
            at = index.numpy()
            s, c, i, p, stage, origin = (t.numpy()[at] for t in (s, c, i, p, self.stage, self.origin))
            if m:
                # a forked copy's stream seed and id are both derived from (value, parent's counter, key), its
                # counter restarts at 0 and its parent is the copied id
                forked = [j for j, k in enumerate(keys) if k is not None]
                fk = [keys[j] for j in forked]
                fs, fc, fi = s[forked].tolist(), c[forked].tolist(), i[forked].tolist()
                if 2 * m < _PER_ITEM_BELOW:  # derive_seeds' per-item path, without the round trip through numpy
                    derived = [derive_seed(*row) for row in zip(fs + fi, fc * 2, fk * 2)]
                else:
                    derived = derive_seeds(fs + fi, fc * 2, fk * 2).tolist()
                p[forked], s[forked], i[forked], c[forked] = fi, derived[:m], derived[m:], 0
            seeds, counters, ids, parents, stage, origin = (torch.from_numpy(v) for v in (s, c, i, p, stage, origin))
        else:
            seeds, counters = s.index_select(0, index), c.index_select(0, index)
            ids, parents = i.index_select(0, index.to(i.device)), p.index_select(0, index.to(p.device))
            stage, origin = self.stage.index_select(0, index.to(self.stage.device)), \
                self.origin.index_select(0, index.to(self.origin.device))
            if m:
                forked = [j for j, k in enumerate(keys) if k is not None]
                sl, cl, il, pl = seeds.tolist(), counters.tolist(), ids.tolist(), parents.tolist()
                derived = derive_seeds([sl[j] for j in forked] + [il[j] for j in forked], [cl[j] for j in forked] * 2,
                                       [keys[j] for j in forked] * 2).tolist()
                for r, j in enumerate(forked):
                    pl[j], sl[j], il[j], cl[j] = il[j], derived[r], derived[m + r], 0
                seeds, counters = torch.tensor(sl, dtype=torch.int64), torch.tensor(cl, dtype=torch.int64)
                ids, parents = (torch.tensor(v, dtype=torch.int64, device=t.device) for v, t in ((il, ids), (pl, parents)))
        data = {k: v.index_select(0, index if v.is_cpu else index.to(v.device))
                for k, v in self.data.items()}
        return State._of(data, stage, Streams._of(seeds, counters), ids, parents, origin, dict(self.meta))

    def select(self, index) -> "State":
        """Exact copies of the candidates at ``index`` (duplicates share their stream)."""
        return self._gather(index, fork=False)

    def resample(self, index, fork_all: bool = False) -> "State":
        """Candidates at ``index``; a duplicate becomes a child with its own forked stream.

        The first copy of each candidate keeps its id and stream, so a
        candidate chosen once continues exactly as if nothing happened; with
        ``fork_all`` every copy is a new child (for offspring that must not
        replay the noise their parent already used).
        """
        return self._gather(index, fork=True, fork_all=fork_all)

    @staticmethod
    def cat(states: Sequence["State"]) -> "State":
        if not states:
            raise ValueError("State.cat needs at least one state")
        keys = set(states[0].data)
        for s in states[1:]:
            if set(s.data) != keys:
                raise ValueError(f"cannot concatenate states with different fields: {sorted(keys)} vs {sorted(s.data)}")
        return State._of(
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
        return State._of(new, self.stage, self.streams, self.ids, self.parents, self.origin, self.meta)

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
