"""``mmtts bench --processes N``: start the sweep's processes with accelerate's launcher."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path


def require_accelerate(what: str) -> None:
    """Refuse ``what`` with the fix when accelerate is not installed."""
    import importlib.util
    if importlib.util.find_spec("accelerate") is None:
        from ..core.errors import MmttsError
        raise MmttsError(f"{what} needs accelerate, which is not installed; pip install \"mmtts[distributed]\"")


def free_port() -> int:
    """A TCP port free on this machine now, for the group's rendezvous (so concurrent sweeps do not collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strip_processes(argv: list[str]) -> list[str]:
    """``argv`` without ``--processes N`` (in either spelling)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--processes":
            skip = True
        elif not a.startswith("--processes="):
            out.append(a)
    return out


def launch_command(argv: list[str], processes: int) -> list[str]:
    """The command that runs ``mmtts <argv>`` in ``processes`` processes.

    accelerate's multi-process launcher (torchrun underneath) starts them;
    each joins the group with gloo on CPUs or NCCL on GPUs. The recorded
    command is the user's, ``--processes`` included.
    """
    user = "mmtts " + " ".join(shlex.quote(a) for a in argv)
    inner = strip_processes(argv)
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "mmtts.cli", *inner, "--command", user]


def launch_bench(argv: list[str], processes: int, out: str, task: str) -> int:
    """Run the sweep in ``processes`` processes; when one fails, say what is saved and how to resume."""
    require_accelerate("--processes")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rc = subprocess.run(launch_command(argv, processes), env=env).returncode
    if rc != 0:
        cells = Path(out) / f"{task}.cells"
        saved = len(list(cells.glob("*.json"))) if cells.is_dir() else 0
        print(f"mmtts: error: the sweep over {processes} processes stopped (exit code {rc}); {saved} finished "
              f"cell(s) are saved in {cells}; rerun the same command with --resume to run only the missing ones",
              file=sys.stderr)
        return 2 if rc > 0 else 1
    return 0
