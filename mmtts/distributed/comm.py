"""The process group of a sharded run, and checked collectives over it.

Processes are started by ``accelerate launch`` (or any launcher that sets
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``); accelerate's :class:`PartialState`
joins the group (gloo on CPUs, NCCL on GPUs). Every collective here is
*checked*: each rank first tells the others whether its local work raised, so
an error on one rank stops every rank at the same collective with that rank's
message, instead of leaving the others waiting for data that never comes. A
rank that dies or hangs is caught by the group's timeout.
"""

from __future__ import annotations

import datetime as _dt
import os
import pickle
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..core.errors import MmttsError

#: seconds a collective waits for a silent rank before every rank stops (``MMTTS_DIST_TIMEOUT`` overrides)
DEFAULT_TIMEOUT = 300.0


class RankFailed(MmttsError):
    """Another rank (or this one) raised during a sharded operation; every rank raises this with its message.

    Args:
        rank: the first rank that failed.
        message: that rank's error, type and text.
    """

    def __init__(self, rank: int, message: str):
        self.rank, self.message = rank, message
        super().__init__(f"rank {rank} failed: {message}")


def launched_world_size() -> int:
    """The number of processes a launcher started this one among (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def split_sizes(n: int, world: int) -> list[int]:
    """Contiguous shard sizes of ``n`` items over ``world`` ranks (the first ``n % world`` ranks take one more)."""
    return [n // world + (r < n % world) for r in range(world)]


@dataclass
class Traffic:
    """Bytes one rank sent and received through collectives, per operation name.

    Args:
        sent: bytes of payload this rank contributed, per operation.
        received: bytes of payload this rank received from the other ranks, per operation.
        calls: collectives per operation.
    """

    sent: dict
    received: dict
    calls: dict

    def add(self, op: str, sent: int, received: int) -> None:
        self.sent[op] = self.sent.get(op, 0) + int(sent)
        self.received[op] = self.received.get(op, 0) + int(received)
        self.calls[op] = self.calls.get(op, 0) + 1

    def as_dict(self) -> dict:
        return {"sent": dict(self.sent), "received": dict(self.received), "calls": dict(self.calls)}


#: bytes moved by the collectives of this process, summed over every :class:`Comm` (see :func:`traffic`)
TRAFFIC = Traffic({}, {}, {})


def traffic(reset: bool = False) -> dict:
    """Bytes this process sent and received per operation (init, step, preview, finish, score) so far."""
    out = TRAFFIC.as_dict()
    if reset:
        TRAFFIC.sent.clear(), TRAFFIC.received.clear(), TRAFFIC.calls.clear()
    return out


class Comm:
    """This process's place in the group and the checked collectives of a sharded run.

    Args:
        timeout: seconds any collective waits for a silent rank before every rank stops with an error
            (default :data:`DEFAULT_TIMEOUT`, or ``MMTTS_DIST_TIMEOUT``). It applies when this call creates the
            process group; a group created before (by an ``Accelerator``) keeps its own.
    """

    def __init__(self, timeout: float | None = None):
        import torch.distributed as dist

        from .launch import require_accelerate
        require_accelerate("a sharded run")
        from accelerate import PartialState

        if timeout is None:
            timeout = float(os.environ.get("MMTTS_DIST_TIMEOUT", DEFAULT_TIMEOUT))
        cpu = not torch.cuda.is_available()
        self.state = PartialState(cpu=cpu, timeout=_dt.timedelta(seconds=timeout))
        self.rank = int(self.state.process_index)
        self.world = int(self.state.num_processes)
        self.dist = dist if self.world > 1 else None
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.is_initialized() and \
            dist.get_backend() == "nccl" else torch.device("cpu")
        self.traffic = TRAFFIC

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's contiguous range ``[start, stop)`` of ``n`` items."""
        sizes = split_sizes(n, self.world)
        start = sum(sizes[:self.rank])
        return start, start + sizes[self.rank]

    # -- checked collectives -------------------------------------------------------
    def _status(self, error: BaseException | None, sizes: tuple[int, int] = (0, 0)) -> list[tuple[int, int]]:
        """Every rank's (meta bytes, payload bytes), after one all-gather of a fixed header; raise
        :class:`RankFailed` on every rank, with the first failing rank's message, when any rank failed."""
        header = torch.tensor([int(error is not None), *sizes], dtype=torch.int64, device=self.device)
        every = [torch.empty_like(header) for _ in range(self.world)]
        self.dist.all_gather(every, header)
        rows = [t.tolist() for t in every]
        if any(r[0] for r in rows):
            messages: list = [None] * self.world
            self.dist.all_gather_object(messages, None if error is None else _describe(error))
            first = next(r for r, row in enumerate(rows) if row[0])
            raise RankFailed(first, messages[first]) from (error if first == self.rank else None)
        return [(r[1], r[2]) for r in rows]

    def all_gather_batch(self, op: str, compute: Callable[[], Any]) -> Any:
        """Run ``compute()`` (this rank's shard of a batch) and return the whole batch, in rank order, on every rank.

        Two collectives: a fixed header (whether this rank failed, and its sizes), then one byte buffer per
        rank. Tensors and dicts of tensors travel as their raw bytes behind a small description; other batches
        (lists of texts or images) travel pickled. Every rank must hold at least one item (callers run batches
        smaller than the group unsharded).
        """
        from ..core.batch import concat
        if self.world == 1:
            return compute()
        try:
            local = compute()
            fields = _tensor_fields(local)
            if fields is None:
                meta, payload = _to_bytes(("objects",)), _to_bytes(local)
            else:
                meta = _to_bytes(("tensors", _skeleton(local), [(str(t.dtype), tuple(t.shape),
                                                                 t.numel() * t.element_size()) for t in fields]))
                payload = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8).to(self.device)
                                     for t in fields]) if fields else torch.empty(0, dtype=torch.uint8)
            error = None
        except Exception as e:  # noqa: BLE001 - reported to every rank, then raised on every rank
            meta = payload = torch.empty(0, dtype=torch.uint8)
            error = e
        sizes = self._status(error, (len(meta), len(payload)))
        width = max(max(m + b for m, b in sizes), 1)
        buf = torch.zeros(width, dtype=torch.uint8, device=self.device)
        buf[:len(meta)] = meta.to(self.device)
        buf[len(meta):len(meta) + len(payload)] = payload.to(self.device)
        bufs = [torch.empty(width, dtype=torch.uint8, device=self.device) for _ in range(self.world)]
        self.dist.all_gather(bufs, buf)
        mine = sizes[self.rank][0] + sizes[self.rank][1]
        self.traffic.add(op, mine, sum(m + b for m, b in sizes) - mine)
        descs = [_from_bytes(raw[:m]) for (m, _), raw in zip(sizes, bufs)]
        bodies = [raw[m:m + b] for (m, b), raw in zip(sizes, bufs)]
        if any(d[0] == "objects" for d in descs):
            return concat([_from_bytes(body) for body in bodies])
        return _join_tensors(list(zip(descs, bodies)), [t.device for t in fields])

    def broadcast_object(self, op: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` on rank 0 only, its value on every rank (a rank 0 error raised on every rank)."""
        if self.world == 1:
            return compute()
        value, error = None, None
        if self.is_main:
            try:
                value = compute()
            except Exception as e:  # noqa: BLE001
                error = e
        self._status(error)
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        size = len(_to_bytes(box[0]))
        self.traffic.add(op, size if self.is_main else 0, 0 if self.is_main else size)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            self.dist.barrier()


def _describe(e: BaseException) -> str:
    where = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
    at = f" (at {where[0].filename}:{where[0].lineno})" if where else ""
    return f"{type(e).__name__}: {e}{at}"


_DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
                               torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64)}


def _tensor_fields(batch: Any) -> list[torch.Tensor] | None:
    """The tensors of a tensor or (nested) dict-of-tensors batch in a fixed order; None for other batches."""
    if isinstance(batch, torch.Tensor):
        return [batch] if str(batch.dtype) in _DTYPES and batch.ndim > 0 else None
    if isinstance(batch, dict):
        out = []
        for k in sorted(batch):
            sub = _tensor_fields(batch[k])
            if sub is None:
                return None
            out += sub
        return out
    return None


def _skeleton(batch: Any) -> Any:
    """The nesting of a tensor or dict batch (None for a tensor), to rebuild it from its gathered tensors."""
    return None if isinstance(batch, torch.Tensor) else {k: _skeleton(batch[k]) for k in sorted(batch)}


def _join_tensors(parts: list, devices: list[torch.device]) -> Any:
    """Every rank's raw tensor slices (rank order), concatenated per field on this rank's device of that field,
    in the batch's nesting."""
    skeleton = parts[0][0][1]
    columns: list[list[torch.Tensor]] = [[] for _ in parts[0][0][2]]
    for (_, _, specs), body in parts:
        at = 0
        for j, (dtype, shape, nbytes) in enumerate(specs):
            raw = body[at:at + nbytes].clone()  # its own storage: a view as a wider dtype needs an aligned start
            columns[j].append(raw.view(_DTYPES[dtype]).reshape(shape).to(devices[j]))
            at += nbytes
    fields = iter([torch.cat(c) for c in columns])

    def build(x):
        return next(fields) if x is None else {k: build(x[k]) for k in sorted(x)}
    return build(skeleton)


def _to_bytes(x: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(x)), dtype=torch.uint8)


def _from_bytes(t: torch.Tensor) -> Any:
    return pickle.loads(t.cpu().numpy().tobytes())
