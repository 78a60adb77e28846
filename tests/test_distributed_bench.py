"""Sharded benchmark sweeps: cells over two CPU processes give the rows of one process; saved cells resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import mmtts
from mmtts.bench import run_benchmark

TIMEOUT = 240


def bench(*args, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    env = {**os.environ, "MMTTS_PROGRESS": "0", "OMP_NUM_THREADS": "1", "MMTTS_DIST_TIMEOUT": "60"}
    return subprocess.run([sys.executable, "-m", "mmtts.cli", "bench", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def deterministic(rows: list[dict]) -> list[dict]:
    """Rows without the wall-clock metrics some tasks report (``*_s``), which no two runs share."""
    drop = lambda d: {k: v for k, v in d.items() if not k.split("_ci95")[0].endswith("_s")}  # noqa: E731
    return [{**r, "metrics": drop(r["metrics"]), "per_seed": drop(r["per_seed"])} for r in rows]


def test_sharded_toy_gmm_rows_equal_one_process(tmp_path):
    one = run_benchmark(mmtts.create_task("toy-gmm"), [0, 1, 2], [20, 80])
    run = bench("toy-gmm", "--seeds", "0", "1", "2", "--budgets", "20", "80", "--out", str(tmp_path),
                "--processes", "2")
    assert run.returncode == 0, run.stderr
    res = json.loads((tmp_path / "toy-gmm.json").read_text())
    assert res["rows"] == one["rows"]
    assert res["processes"] == 2 and res["command"].endswith("--processes 2")
    cells = [json.loads(p.read_text()) for p in (tmp_path / "toy-gmm.cells").glob("*.json")]
    assert len(cells) == 18 and {c["rank"] for c in cells} <= {0, 1}
    assert not list((tmp_path / "toy-gmm.cells").glob("*.claim"))
    assert (tmp_path / "toy-gmm.md").exists() and (tmp_path / "toy-gmm.png").exists()


def test_resume_runs_only_the_missing_cells(tmp_path):
    task = mmtts.create_task("toy-gmm")
    full = run_benchmark(task, [0, 1], [20, 80], out=tmp_path)
    saved = sorted((tmp_path / "toy-gmm.cells").glob("*.json"))
    assert len(saved) == 12
    for p in saved[:5]:
        p.unlink()
    ran = []
    original = task.run
    task.run = lambda *a: ran.append(a) or original(*a)
    again = run_benchmark(task, [0, 1], [20, 80], out=tmp_path, resume=True)
    assert len(ran) == 5 and again["rows"] == full["rows"]
    ran.clear()
    fresh = run_benchmark(task, [0, 1], [20, 80], out=tmp_path)  # without resume every cell runs again
    assert len(ran) == 12 and fresh["rows"] == full["rows"]


def test_resume_refuses_cells_of_another_configuration(tmp_path):
    run_benchmark(mmtts.create_task("toy-gmm"), [0, 1], [20], out=tmp_path)
    with pytest.raises(mmtts.MmttsError, match="different configuration"):
        run_benchmark(mmtts.create_task("toy-gmm", stages=10), [0, 1], [20], out=tmp_path, resume=True)
    with pytest.raises(mmtts.MmttsError, match="--resume needs --out"):
        run_benchmark(mmtts.create_task("toy-gmm"), [0, 1], [20], resume=True)


@pytest.mark.slow
def test_sharded_image_search_quick_rows_equal_one_process(tmp_path, cache_dir):
    one = run_benchmark(mmtts.create_task("image-search", quick=True), [0, 1], [8, 24])
    run = bench("image-search", "--quick", "--seeds", "0", "1", "--out", str(tmp_path), "--processes", "2")
    assert run.returncode == 0, run.stderr
    res = json.loads((tmp_path / "image-search.json").read_text())
    assert deterministic(res["rows"]) == deterministic(one["rows"])


@pytest.mark.slow
def test_killed_worker_stops_the_sweep_and_resume_completes_it(tmp_path):
    args = ["toy-gmm", "--seeds", *map(str, range(8)), "--budgets", "80", "320", "1280", "--out", str(tmp_path),
            "--processes", "2"]
    one = run_benchmark(mmtts.create_task("toy-gmm"), list(range(8)), [80, 320, 1280])
    env = {**os.environ, "MMTTS_PROGRESS": "0", "OMP_NUM_THREADS": "1", "MMTTS_DIST_TIMEOUT": "60"}
    proc = subprocess.Popen([sys.executable, "-m", "mmtts.cli", "bench", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    cells, victim, deadline = tmp_path / "toy-gmm.cells", None, time.monotonic() + TIMEOUT
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        for p in cells.glob("*.json") if cells.is_dir() else []:
            rec = json.loads(p.read_text())
            if rec["rank"] == 1:
                victim = rec["pid"]
                break
        time.sleep(0.05)
    assert victim is not None, "no cell of rank 1 appeared"
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode != 0
    assert "rerun the same command with --resume" in err, err
    assert "stopped by the launcher" in err, err  # rank 0 says why it stopped, and what is saved
    saved = {p.name for p in cells.glob("*.json")}
    assert 0 < len(saved) < 72, "the kill came too late to test resuming"
    run = bench(*args, "--resume")
    assert run.returncode == 0, run.stderr
    res = json.loads((tmp_path / "toy-gmm.json").read_text())
    assert res["rows"] == one["rows"]
    pids = {json.loads((cells / name).read_text())["pid"] for name in saved}
    rerun = [json.loads(p.read_text()) for p in cells.glob("*.json") if p.name not in saved]
    assert len(rerun) == 72 - len(saved) and not pids & {r["pid"] for r in rerun}


def test_processes_flag_is_checked_and_launches_accelerate(capsys):
    from mmtts.cli import main
    from mmtts.distributed.launch import launch_command, strip_processes
    assert main(["bench", "toy-gmm", "--processes", "0"]) == 2
    assert "--processes 0" in capsys.readouterr().err
    argv = ["toy-gmm", "--processes", "3", "--seeds", "0", "--processes=3", "--resume"]
    assert strip_processes(argv) == ["toy-gmm", "--seeds", "0", "--resume"]
    cmd = launch_command(argv, 3)
    assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--multi_gpu"]
    assert cmd[cmd.index("--num_processes") + 1] == "3"
    at = cmd.index("-m", 3)
    assert cmd[at + 1:at + 6] == ["mmtts.cli", "toy-gmm", "--seeds", "0", "--resume"]
    assert cmd[-2:] == ["--command", "mmtts " + " ".join(argv)]  # the results record what the user typed
