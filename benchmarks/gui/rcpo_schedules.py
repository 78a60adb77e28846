"""GUI-RCPO schedules on the box-answering VLM: greedy accuracy and the greedy box's size as the policy adapts.

On validation seeds of ``gui-grounding-vlm`` (never in the reported table)
this runs greedy and GUI-RC (K = 16) once, then GUI-RCPO with each
(learning rate, passes) pair of ``--grid`` followed by greedy, and records
the accuracy and the median area of the greedy boxes on the first seed.
Writes rcpo_schedules.json and rcpo_schedules.md beside this script (or under --out).

    python benchmarks/gui/rcpo_schedules.py [--seeds 100 101 102] [--screens 20] [--grid 1e-4:1 1e-4:6 ...]
                                            [--out DIR] [--quick --cache DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mmtts.core.rng import derive_seed
from mmtts.modalities.gui.parse import parse_answers
from mmtts.tasks.cache import ModelCache
from mmtts.tasks.gui_grounding import GUIGroundingVLM

SETTING = "vlm-box-t0.5"
GRID = ("1e-4:1", "1e-4:3", "1e-4:6", "3e-4:1", "3e-4:3", "1e-3:1", "1e-3:3")


def greedy_box_area(task: GUIGroundingVLM, method: str, seed: int) -> float:
    """Median area (pixels²) of the greedy answer boxes of ``method``'s model on ``seed``'s instructions."""
    examples, pixels = task.data(seed)
    sampler, _ = task.sampler(method, SETTING, seed)
    areas = []
    for i, (ex, px) in enumerate(zip(examples, pixels)):
        b = parse_answers(sampler.sample(px, ex.instruction, [derive_seed(seed, i)], 0.0), "permille",
                          ex.image_size).boxes[0]
        if np.isfinite(b).all():
            areas.append(float((b[2] - b[0]) * (b[3] - b[1])))
    return float(np.median(areas)) if areas else float("nan")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102])
    ap.add_argument("--screens", type=int, default=20, help="screens per seed (three instructions each)")
    ap.add_argument("--grid", nargs="+", default=list(GRID), help="lr:passes pairs")
    ap.add_argument("--out", default=str(Path(__file__).parent))
    ap.add_argument("--quick", action="store_true", help="the quick model (for tests)")
    ap.add_argument("--cache", default=None, help="model cache directory")
    args = ap.parse_args(argv)
    cache = ModelCache(args.cache) if args.cache else None
    make = lambda **o: GUIGroundingVLM(cache=cache, quick=args.quick, screens=args.screens, **o)  # noqa: E731
    base = make()
    acc = lambda task, method: float(np.mean([task.run(method, SETTING, 16, s)["accuracy"]  # noqa: E731
                                              for s in args.seeds]))
    res = {"seeds": args.seeds, "screens": args.screens, "setting": SETTING, "greedy": acc(base, "greedy"),
           "gui_rc_16": acc(base, "gui-rc"), "greedy_box_area": greedy_box_area(base, "greedy", args.seeds[0]),
           "rcpo": []}
    for pair in args.grid:
        lr, passes = pair.split(":")
        task = make(rcpo_lr=float(lr), rcpo_epochs=int(passes))
        res["rcpo"].append({"lr": float(lr), "passes": int(passes), "greedy_after": acc(task, "gui-rcpo"),
                            "greedy_box_area": greedy_box_area(task, "gui-rcpo", args.seeds[0])})
    lines = [f"# GUI-RCPO schedules on the box VLM ({SETTING}, seeds {args.seeds}, {args.screens} screens each)", "",
             f"greedy {100 * res['greedy']:.1f}%, GUI-RC K=16 {100 * res['gui_rc_16']:.1f}%, median greedy box "
             f"{res['greedy_box_area']:.0f} px² (seed {args.seeds[0]})", "",
             "| lr | passes | greedy after GUI-RCPO | median greedy box (px²) |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['lr']:g} | {r['passes']} | {100 * r['greedy_after']:.1f}% | {r['greedy_box_area']:.0f} |"
              for r in res["rcpo"]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rcpo_schedules.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "rcpo_schedules.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return res


if __name__ == "__main__":
    main()
