"""Progress bars for long work (training reference models, benchmark sweeps).

Set MMTTS_PROGRESS=0 to silence them (the tests do).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_enabled() -> bool:
    return os.environ.get("MMTTS_PROGRESS", "1") not in ("0", "false", "no")


@contextmanager
def progress_bar(total: int, description: str):
    """Yield ``advance(n=1, **fields)``; draws a rich bar on stderr unless disabled."""
    if not progress_enabled():
        yield lambda n=1, **kw: None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=False) as prog:
        task = prog.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields):
            info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            prog.update(task, advance=n, info=info)

        yield advance
