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
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

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
    def run(self, op: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` on this rank; if it raised on any rank, every rank raises :class:`RankFailed` naming it."""
        try:
            value, error = fn(), None
        except Exception as e:  # noqa: BLE001 - reported to every rank, then raised
            value, error = None, e
        self.checked(op, value, error)
        return value

    def checked(self, op: str, value: Any, error: BaseException | None, meta: Any = None) -> list:
        """Exchange (error, meta) with every rank; raise :class:`RankFailed` for the first rank that failed.

        Returns every rank's ``meta``, in rank order.
        """
        if self.world == 1:
            if error is not None:
                raise error
            return [meta]
        mine = (None if error is None else _describe(error), meta)
        every: list = [None] * self.world
        self.dist.all_gather_object(every, mine)
        for r, (err, _) in enumerate(every):
            if err is not None:
                raise RankFailed(r, err) from (error if r == self.rank else None)
        return [m for _, m in every]

    def all_gather_batch(self, op: str, compute: Callable[[], Any]) -> Any:
        """Run ``compute()`` (this rank's shard of a batch) and return the whole batch, in rank order, on every rank.

        Every rank must hold at least one item (callers run batches smaller than the group unsharded).
        Tensors and dicts of tensors travel as one padded byte buffer per rank (a single all-gather); other
        batches (lists of texts or images) travel pickled.
        """
        from ..core.batch import concat
        try:
            local = compute()
            fields = _tensor_fields(local)
            meta = _meta(fields) if fields is not None else ("objects", None)
            error = None
        except Exception as e:  # noqa: BLE001
            local, fields, meta, error = None, None, None, e
        metas = self.checked(op, local, error, meta)
        if self.world == 1:
            return local
        if any(m[0] == "objects" for m in metas):
            every: list = [None] * self.world
            self.dist.all_gather_object(every, local)
            self.traffic.add(op, _pickled_size(local), sum(_pickled_size(b) for b in every))
            return concat([b for b in every if b is not None])
        gathered = self._gather_fields(op, fields, metas)
        return _rebuild(local, gathered)

    def _gather_fields(self, op: str, fields: list[torch.Tensor], metas: list) -> list[torch.Tensor]:
        nbytes = [sum(b for _, _, _, b in m[1]) for m in metas]
        width = max(max(nbytes), 1)
        flat = [t.detach().contiguous().reshape(-1).view(torch.uint8).to(self.device) for t in fields]
        buf = torch.zeros(width, dtype=torch.uint8, device=self.device)
        if flat and nbytes[self.rank]:
            buf[:nbytes[self.rank]] = torch.cat(flat)
        bufs = [torch.empty(width, dtype=torch.uint8, device=self.device) for _ in range(self.world)]
        self.dist.all_gather(bufs, buf)
        self.traffic.add(op, nbytes[self.rank], sum(nbytes) - nbytes[self.rank])
        device = fields[0].device if fields else torch.device("cpu")
        per_field: list[list[torch.Tensor]] = [[] for _ in metas[0][1]]
        for r, m in enumerate(metas):
            at = 0
            for j, (_, dtype, shape, b) in enumerate(m[1]):
                part = bufs[r][at:at + b]
                at += b
                if b:
                    per_field[j].append(part.view(_DTYPES[dtype]).reshape(-1, *shape).to(device))
        out = []
        for j, (_, dtype, shape, _) in enumerate(metas[0][1]):
            parts = per_field[j]
            out.append(torch.cat(parts) if parts else torch.empty(0, *shape, dtype=_DTYPES[dtype], device=device))
        return out

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
        self.checked(op, None, error)
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        size = _pickled_size(box[0])
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


def _meta(fields: Sequence[torch.Tensor]) -> tuple:
    return ("tensors", [(i, str(t.dtype), tuple(t.shape[1:]), t.numel() * t.element_size())
                        for i, t in enumerate(fields)])


def _rebuild(template: Any, gathered: list[torch.Tensor]) -> Any:
    it = iter(gathered)

    def build(x):
        if isinstance(x, torch.Tensor):
            return next(it)
        return {k: build(x[k]) for k in sorted(x)}
    return build(template)


def _pickled_size(x: Any) -> int:
    import pickle
    return len(pickle.dumps(x))
