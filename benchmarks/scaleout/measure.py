"""Measure scale-out on this machine: 2 processes against 1, side by side in one run.

1. Cell sharding: ``mmtts bench image-search --quick`` over a sweep of cells,
   one process against ``--processes 2`` (each process single-threaded), in
   alternating order; throughput = cells / the sweep's span (first cell start to
   last cell end, from the saved cell files), and also per command wall time
   (start-up included). The rows must be identical (wall-clock metrics aside).
2. Search sharding: one image-search search of population n (best-of-N and a
   particle filter), on the quick models and on the full ones, in one process
   against two (``search_worker.py``); the ratio of median seconds per search,
   the bytes each rank sends and receives per stage, and digests of the Results
   (they must match).

Writes ``<out>/scale-out.json`` and ``<out>/scale-out.md``; with ``--append``
the new measurement is added after those already there (the machine is shared,
so runs at different loads belong side by side).

    python benchmarks/scaleout/measure.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MMTTS_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}


def load() -> float:
    return os.getloadavg()[0]


def deterministic(rows: list[dict]) -> list[dict]:
    drop = lambda d: {k: v for k, v in d.items() if not k.split("_ci95")[0].endswith("_s")}  # noqa: E731
    return [{**r, "metrics": drop(r["metrics"]), "per_seed": drop(r["per_seed"])} for r in rows]


def bench_run(args, processes: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "mmtts.cli", "bench", "image-search", "--quick", "--seeds", *map(str, args.seeds),
           "--budgets", *map(str, args.budgets), "--out", str(out)]
    if processes > 1:
        cmd += ["--processes", str(processes)]
    before = load()
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    cells = [json.loads(p.read_text()) for p in (out / "image-search.cells").glob("*.json")]
    span = max(c["finished"] for c in cells) - min(c["finished"] - c["seconds"] for c in cells)
    busiest = max(sum(c["cpu_seconds"] for c in cells if c["rank"] == r) for r in range(processes))
    res = json.loads((out / "image-search.json").read_text())
    return {"processes": processes, "cells": len(cells), "sweep_seconds": span, "command_seconds": wall,
            "cells_per_second": len(cells) / span, "cpu_seconds_per_cell": sum(c["cpu_seconds"] for c in cells)
            / len(cells), "cells_per_cpu_second_of_busiest": len(cells) / busiest,
            "load_before": before, "load_after": load(),
            "rows": deterministic(res["rows"]), "command": shown(cmd, out)}


def search_run(args, processes: int, full: bool, out: Path) -> dict:
    worker = [str(HERE / "search_worker.py"), str(out), "--n", str(args.n), "--repeats", str(args.repeats)]
    if full:
        worker.append("--full")
    if processes == 1:
        cmd = [sys.executable, *worker]
    else:
        from mmtts.distributed.launch import free_port
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), *worker]
    before = load()
    subprocess.run(cmd, check=True, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL)
    rep = json.loads(out.read_text())
    rep["load_before"], rep["load_after"] = before, load()
    rep["command"] = shown(cmd, out)
    return rep


def shown(cmd: list[str], out: Path) -> str:
    """A command as a user types it: ``mmtts`` and ``accelerate launch`` for the module runs, OUT for the
    temporary output, paths relative to the repository."""
    text = " ".join(cmd).replace(sys.executable + " -m mmtts.cli", "mmtts")
    text = text.replace(sys.executable + " -m accelerate.commands.launch", "accelerate launch")
    text = text.replace(sys.executable + " ", "python ").replace(str(out), "OUT").replace(str(ROOT) + "/", "")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--budgets", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--rounds", type=int, default=2, help="alternating 1-process / 2-process sweeps")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="searches timed per process count")
    ap.add_argument("--append", action="store_true", help="keep the measurements already in --out")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mmtts-scaleout-"))
    try:
        cells = []
        for r in range(args.rounds):
            for p in ((1, 2) if r % 2 == 0 else (2, 1)):
                cells.append(bench_run(args, p, tmp / f"cells-p{p}-r{r}"))
                print(f"cells: {p} process(es): {cells[-1]['cells_per_second']:.3g} cells/s", flush=True)
        identical_rows = all(c["rows"] == cells[0]["rows"] for c in cells)
        search = {}
        for full in (False, True):
            for p in (1, 2):
                rep = search_run(args, p, full, tmp / f"search-p{p}-{'full' if full else 'quick'}.json")
                search[f"{'full' if full else 'quick'}/{p}"] = rep
                print(f"search ({'full' if full else 'quick'} models), {p} process(es): done", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results = summarize(args, cells, identical_rows, search)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    earlier = json.loads((out / "scale-out.json").read_text())["measurements"] \
        if args.append and (out / "scale-out.json").exists() else []
    write(out, earlier + [results])
    print(markdown(results))


def write(out: Path, measurements: list[dict]) -> None:
    (out / "scale-out.json").write_text(json.dumps({"measurements": measurements}, indent=2) + "\n")
    parts = [markdown(r) if len(measurements) == 1 else markdown(r).replace(
        "# scale-out: 2 processes against 1", f"# scale-out: 2 processes against 1 (measurement {i + 1} of "
        f"{len(measurements)})") for i, r in enumerate(measurements)]
    (out / "scale-out.md").write_text("\n".join(parts))


def summarize(args, cells, identical_rows, search) -> dict:
    def rate(p):
        return statistics.median(c["cells_per_second"] for c in cells if c["processes"] == p)

    def wall(p):
        return statistics.median(c["command_seconds"] for c in cells if c["processes"] == p)

    def unshared(p):
        return statistics.median(c["cells_per_cpu_second_of_busiest"] for c in cells if c["processes"] == p)
    searches = {}
    for models in ("quick", "full"):
        one, two = search[f"{models}/1"], search[f"{models}/2"]
        for method in one["methods"]:
            a, b = one["methods"][method], two["methods"][method]
            t = b["traffic_per_search"]
            stages = a["stages"]
            per_stage = {op: t["received"].get(op, 0) / max(t["calls"].get(op, 1), 1) for op in t["received"]}
            searches[f"{models}/{method}"] = {
                "n": one["n"], "stages": stages, "budget_nfe": a["budget_nfe"],
                "seconds_1": statistics.median(a["seconds"]), "seconds_2": statistics.median(b["seconds"]),
                "throughput_ratio": statistics.median(a["seconds"]) / statistics.median(b["seconds"]),
                "cpu_seconds_1": statistics.median(a["cpu_seconds"]),
                "cpu_seconds_2_rank0": statistics.median(b["cpu_seconds"]),
                "cpu_ratio": statistics.median(a["cpu_seconds"]) / statistics.median(b["cpu_seconds"]),
                "identical_results": set(a["digests"]) == set(b["digests"]) and len(set(a["digests"])) == 1,
                "bytes_received_per_call": per_stage,
                "bytes_per_candidate_per_step": per_stage.get("step", 0) / (one["n"] / 2),
                "collectives_per_search": t["calls"], "bytes_received_per_search": t["received"],
                "commands": [one["command"], two["command"]],
                "load": [one["load_before"], one["load_after"], two["load_before"], two["load_after"]]}
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/scaleout/measure.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu_count": os.cpu_count(), "note": "2 cores shared with other jobs; load averages recorded"},
        "cells": {"task": "image-search --quick", "seeds": args.seeds, "budgets": args.budgets,
                  "runs": [{k: v for k, v in c.items() if k != "rows"} for c in cells],
                  "cells_per_second_1": rate(1), "cells_per_second_2": rate(2),
                  "throughput_ratio": rate(2) / rate(1), "command_seconds_ratio": wall(1) / wall(2),
                  "cpu_bound_ratio": unshared(2) / unshared(1),
                  "identical_rows": identical_rows},
        "search": searches,
    }


def markdown(r: dict) -> str:
    c = r["cells"]
    lines = ["# scale-out: 2 processes against 1", "", f"Command: `{r['command']}`  ", f"Created: {r['created']}  ",
             f"Machine: {r['machine']['cpu_count']} CPUs, {r['machine']['note']}", "",
             "## Cell sharding (`mmtts bench image-search --quick`)", "",
             f"Seeds {c['seeds']}, budgets {c['budgets']}: {c['runs'][0]['cells']} cells per sweep; rows identical "
             f"across every run: **{c['identical_rows']}**.", "",
             "| processes | cells/s (sweep span) | sweep s | command s (with start-up) | CPU s per cell | "
             "cells per CPU s of the busiest process | load 1-min before/after |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for run in c["runs"]:
        lines.append(f"| {run['processes']} | {run['cells_per_second']:.3g} | {run['sweep_seconds']:.3g} | "
                     f"{run['command_seconds']:.3g} | {run['cpu_seconds_per_cell']:.3g} | "
                     f"{run['cells_per_cpu_second_of_busiest']:.3g} | "
                     f"{run['load_before']:.2f} / {run['load_after']:.2f} |")
    lines += ["", f"Throughput ratio (median cells/s over the sweep span, 2 over 1): **{c['throughput_ratio']:.2f}x**; "
                  f"whole command (start-up included): {c['command_seconds_ratio']:.2f}x; "
                  f"from CPU time (cells per CPU second of the busiest process: the rate when each process has "
                  f"a core to itself): {c['cpu_bound_ratio']:.2f}x.", "",
              "Commands (OUT: a fresh directory per run): " + "; ".join(
                  f"`{cmd}`" for cmd in dict.fromkeys(run["command"] for run in c["runs"])),
              "", "## Search sharding (one search, population n, image-search models)", "",
              "| models/method | n | stages | s/search 1 proc | s/search 2 procs | ratio | CPU s 1 proc | "
              "CPU s rank 0 of 2 | CPU ratio | identical | bytes/step received per rank | "
              "bytes per candidate per step | preview + score bytes per call |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for name, s in r["search"].items():
        b = s["bytes_received_per_call"]
        extra = f"{b.get('preview', 0):.0f} + {b.get('score', 0):.0f}"
        lines.append(f"| {name} | {s['n']} | {s['stages']} | {s['seconds_1']:.3g} | {s['seconds_2']:.3g} | "
                     f"{s['throughput_ratio']:.2f}x | {s['cpu_seconds_1']:.3g} | {s['cpu_seconds_2_rank0']:.3g} | "
                     f"{s['cpu_ratio']:.2f}x | {s['identical_results']} | {b.get('step', 0):.0f} | "
                     f"{s['bytes_per_candidate_per_step']:.0f} | {extra} |")
    lines += ["", "Commands (OUT: the worker's report; the launcher's port is free at the time of the run):", ""]
    for name, s in r["search"].items():
        lines += [f"- {name}: `{s['commands'][0]}` and `{s['commands'][1]}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
