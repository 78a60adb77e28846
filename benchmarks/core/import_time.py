"""What ``import mmtts`` costs on top of ``import torch``, and what it loads.

Each measurement is a fresh interpreter that imports torch, then (in the
``mmtts`` runs) mmtts, and reports its own wall time for the imports, so
interpreter start-up is excluded. The two kinds alternate, ``--repeats``
times each; the table gives the medians and their difference, and the
modules ``import mmtts`` adds (by top-level package). Writes import_time.json
and import_time.md beside this script (or under --out).

    python benchmarks/core/import_time.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
before = set(sys.modules)
if {with_mmtts}:
    import mmtts
    if {with_core}:
        mmtts.Budget  # the core: what mmtts.search and mmtts.adapt load on first use
t2 = time.perf_counter()
added = sorted({{m.split('.')[0] for m in set(sys.modules) - before}})
print(json.dumps({{"torch": t1 - t0, "mmtts": t2 - t1, "total": t2 - t0, "added": added,
                  "mmtts_modules": sorted(m for m in sys.modules if m.startswith("mmtts"))}}))
"""


def probe(with_mmtts: bool, with_core: bool = False) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(with_mmtts=with_mmtts, with_core=with_core)], capture_output=True, text=True,
                         check=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = ap.parse_args(argv)
    torch_only, with_mmtts, with_core = [], [], []
    for _ in range(args.repeats):
        torch_only.append(probe(False))
        with_mmtts.append(probe(True))
        with_core.append(probe(True, True))
    t_torch = statistics.median(r["total"] for r in torch_only)
    t_both = statistics.median(r["total"] for r in with_mmtts)
    t_core = statistics.median(r["total"] for r in with_core)
    from mmtts.bench import machine_info, versions
    result = {
        "command": "python benchmarks/core/import_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "versions": versions(), "repeats": args.repeats,
        "import_torch_s": {"median": t_torch, "all": [r["total"] for r in torch_only]},
        "import_torch_then_mmtts_s": {"median": t_both, "all": [r["total"] for r in with_mmtts]},
        "mmtts_over_torch_s": t_both - t_torch,
        "import_torch_then_mmtts_core_s": {"median": t_core, "all": [r["total"] for r in with_core]},
        "mmtts_core_over_torch_s": t_core - t_torch,
        "packages_added_by_mmtts_core": with_core[-1]["added"],
        "goal_s": 0.3,
        "packages_added_by_mmtts": with_mmtts[-1]["added"],
        "mmtts_modules": with_mmtts[-1]["mmtts_modules"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "import_time.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "import_time.md").write_text(
        "# import mmtts\n\n"
        f"`{result['command']}` ({result['date']}, {args.repeats} fresh interpreters each, medians)\n\n"
        "| import | seconds |\n|---|---|\n"
        f"| torch | {t_torch:.3f} |\n| torch, then mmtts | {t_both:.3f} |\n"
        f"| torch, then mmtts and its core (`mmtts.Budget`) | {t_core:.3f} |\n"
        f"| **mmtts over torch** | **{t_both - t_torch:.3f}** (goal <= 0.3) |\n"
        f"| **mmtts with its core over torch** | **{t_core - t_torch:.3f}** (goal <= 0.3) |\n\n"
        f"Packages `import mmtts` adds: {', '.join(result['packages_added_by_mmtts'])}; with its core: "
        f"{', '.join(result['packages_added_by_mmtts_core'])}.\n\n"
        f"mmtts modules loaded ({len(result['mmtts_modules'])}): {', '.join(result['mmtts_modules'])}.\n")
    print((args.out / "import_time.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
