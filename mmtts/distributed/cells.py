"""The cells of a benchmark sweep, saved as they finish and shared out over processes.

A cell is one (setting, method, budget, seed) run. Each finished cell is
written to its own file under ``<out>/<task>.cells/`` (written to a temporary
name, then renamed: a killed process never leaves half a file), so a sweep
that stops resumes with ``--resume`` and runs only the missing cells.

Under a launcher (``WORLD_SIZE`` > 1) every process runs single-threaded and
claims the next unclaimed cell, largest budget first, by creating its claim
file exclusively; rank 0 draws one progress bar from the files of finished
cells and, when every cell has its file, reads them all. The results
directory must therefore be one directory seen by every process (one machine,
or a shared filesystem across machines). A process that raises leaves its
error in the directory and rank 0 stops with it; a process that is killed
makes the launcher stop the others, each naming the saved cells and
``--resume``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import signal
import threading
import time
from pathlib import Path
from typing import Callable

from ..core.errors import MmttsError
from ..core.progress import progress_bar

Cell = tuple  # (setting, method, budget, seed)
POLL_SECONDS = 0.25


class SweepStopped(MmttsError):
    """The sweep stopped before every cell finished; the finished ones are saved for ``--resume``."""


class CellStore:
    """Finished cells of one sweep as files in ``<out>/<task>.cells/``.

    Args:
        out: the results directory.
        task: the task's name.
        identity: what must match for a saved cell to count (the task's configuration).
    """

    def __init__(self, out: str | os.PathLike, task: str, identity: dict):
        self.dir = Path(out) / f"{task}.cells"
        self.identity = json.loads(json.dumps(identity, default=repr))

    def key(self, cell: Cell) -> str:
        setting, method, budget, seed = cell
        slug = re.sub(r"[^A-Za-z0-9.+-]+", "_", f"{setting}~{method}~{budget}~{seed}")
        digest = hashlib.sha1(json.dumps(list(cell)).encode()).hexdigest()[:8]
        return f"{slug}-{digest}"

    def path(self, cell: Cell) -> Path:
        return self.dir / f"{self.key(cell)}.json"

    def save(self, cell: Cell, metrics: dict, seconds: float, cpu_seconds: float) -> None:
        """Write ``cell``'s record: its metrics, wall and CPU seconds, when it finished, and who ran it."""
        rec = {"cell": list(cell), "identity": self.identity, "metrics": metrics, "seconds": seconds,
               "cpu_seconds": cpu_seconds, "finished": time.time(),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "pid": os.getpid(),
               "rank": int(os.environ.get("RANK", "0"))}
        tmp = self.dir / f".{self.key(cell)}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, self.path(cell))

    def load(self, cell: Cell) -> dict | None:
        """The saved record of ``cell``; None when missing. A record of another configuration is refused."""
        try:
            rec = json.loads(self.path(cell).read_text())
        except FileNotFoundError:
            return None
        if rec["identity"] != self.identity or rec["cell"] != list(cell):
            raise MmttsError(f"the saved cells in {self.dir} were written by a different configuration "
                             f"({rec['identity']}); delete that directory or drop --resume")
        return rec

    def finished(self, cells: list[Cell]) -> int:
        return sum(self.path(c).exists() for c in cells)

    def reset(self, keep_results: bool) -> None:
        """Clear claims and errors of an earlier run (and its results unless ``keep_results``)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for p in self.dir.iterdir():
            if p.suffix in (".claim", ".error", ".tmp") or (p.suffix == ".json" and not keep_results):
                p.unlink(missing_ok=True)

    def claim(self, cell: Cell) -> bool:
        """Take ``cell`` for this process; False when another process took it first."""
        try:
            os.close(os.open(self.dir / f"{self.key(cell)}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    def fail(self, rank: int, message: str) -> None:
        (self.dir / f"rank{rank}.error").write_text(message)

    def failure(self) -> str | None:
        for p in sorted(self.dir.glob("*.error")):
            return f"{p.stem.replace('rank', 'rank ')} failed: {p.read_text()}"
        return None


def run_cells(cells: list[Cell], run: Callable[[Cell], dict], prepare: Callable[[], object], store: CellStore | None,
              resume: bool, description: str) -> dict | None:
    """Run every cell not already saved; return ``{cell: record}`` for all cells (None on ranks other than 0).

    ``record`` holds ``metrics``, ``seconds`` and ``peak_rss_mb`` (and, read from a cell file, what
    :meth:`CellStore.save` wrote).
    """
    from .comm import launched_world_size
    if resume and store is None:
        raise MmttsError("--resume needs --out, the directory whose saved cells to resume from")
    if launched_world_size() > 1:
        if store is None:
            raise MmttsError("a sharded sweep needs --out, a directory every process writes its cells to")
        return _run_sharded(cells, run, prepare, store, resume, description)
    prepare()
    if store is not None:
        store.reset(keep_results=resume)
    done = {c: store.load(c) for c in cells} if resume else {}
    done = {c: r for c, r in done.items() if r is not None}
    with progress_bar(len(cells), description) as advance:
        advance(len(done))
        for cell in cells:
            if cell in done:
                continue
            done[cell] = _run_one(cell, run, store)
            advance(1, setting=cell[0], method=cell[1], budget=cell[2])
    return done


def _run_one(cell: Cell, run, store: CellStore | None) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    metrics = {k: float(v) for k, v in run(cell).items()}
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if store is not None:
        store.save(cell, metrics, seconds, cpu)
    return {"metrics": metrics, "seconds": seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def _run_sharded(cells, run, prepare, store: CellStore, resume: bool, description: str) -> dict | None:
    import torch

    from .comm import Comm
    torch.set_num_threads(1)
    comm = Comm()
    previous = signal.signal(signal.SIGTERM, _stopped_by_launcher(store, cells))
    try:
        if comm.is_main:  # trains and caches the reference models once, before the others load them
            prepare()
            store.reset(keep_results=resume)
            if resume:
                for c in cells:
                    store.load(c)  # refuses cells of another configuration before any work
        comm.barrier()
        if not comm.is_main:
            prepare()  # loads what rank 0 cached
        comm.barrier()  # every process starts its cells ready, so the shares even out
        order = sorted(cells, key=lambda c: -(c[2] or 0))  # largest budgets first: the shares even out
        if not comm.is_main:
            _claim_and_run(order, run, store, comm.rank)
            return None
        return _main_rank(cells, order, run, store, description)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _claim_and_run(order, run, store: CellStore, rank: int, on_failure: Callable[[str], None] | None = None) -> None:
    """Claim and run cells until none is left; ``on_failure`` is called with another rank's error when one
    appears between cells."""
    try:
        for cell in order:
            failed = store.failure() if on_failure is not None else None
            if failed:
                on_failure(failed)
            if store.path(cell).exists() or not store.claim(cell):
                continue
            _run_one(cell, run, store)
    except SweepStopped:
        raise
    except Exception as e:
        store.fail(rank, f"{type(e).__name__}: {e}")
        raise


def _main_rank(cells, order, run, store: CellStore, description: str) -> dict:
    stop = threading.Event()
    with progress_bar(len(cells), description) as advance:
        shown = [0]

        def show():
            n = store.finished(cells)
            if n > shown[0]:
                advance(n - shown[0])
                shown[0] = n

        def poll():
            while not stop.wait(POLL_SECONDS):
                show()
        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        def stop_with(failed: str):
            raise SweepStopped(f"{failed}; {store.finished(cells)} of {len(cells)} cells are saved in "
                               f"{store.dir}; fix it and rerun with --resume to run only the missing ones")
        try:
            _claim_and_run(order, run, store, 0, on_failure=stop_with)
            while True:
                failed = store.failure()
                if failed:
                    stop_with(failed)
                if all(store.path(c).exists() for c in cells):
                    break
                time.sleep(POLL_SECONDS)
        finally:
            stop.set()
            watcher.join()
            show()
    store.reset(keep_results=True)  # the claims served their sweep
    return {c: store.load(c) for c in cells}


def _stopped_by_launcher(store: CellStore, cells: list[Cell]):
    def handler(signum, frame):
        raise SweepStopped(f"stopped by the launcher (another process of the sweep failed or was stopped); "
                           f"{store.finished(cells)} of {len(cells)} cells are saved in {store.dir}; rerun with "
                           "--resume to run only the missing ones")
    return handler
