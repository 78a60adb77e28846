"""How much can voting gain on the gui-grounding models? Bounds measured on validation seeds.

For each validation instruction (seeds 100-102 of ``gui-grounding``, never
in the reported table) this computes, from the cached models:

- ``greedy``: digit-by-digit greedy click, and the box the box network gives
  under it (its centre is the answer);
- ``mass oracle``: the element holding the most probability mass (knows every
  element's true box; the limit of element-level voting with infinitely many
  samples at T = 1);
- ``vote, true boxes`` and ``vote, learned boxes``: GUI-RC with K sampled
  clicks at temperature T voting with the true box of the element under each
  click (a click on no element keeps its learned box) or with the box
  network's box, on the same samples;
- the box network's IoU with the element under each sampled click.

Writes vote_bounds.json and vote_bounds.md beside this script (or under --out).

    python benchmarks/gui/vote_bounds.py [--seeds 100 101 102] [--out DIR] [--quick --cache DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from mmtts.core.rng import derive_seed
from mmtts.core.threads import one_thread
from mmtts.modalities.gui.model import (CELLS, boxes_at, centres_in_box, greedy_digits, image_tensor, sample_cells,
                                        tokenize)
from mmtts.modalities.gui.render import render_screen
from mmtts.strategies.region_vote import consensus
from mmtts.tasks.cache import ModelCache
from mmtts.tasks.gui_grounding import TEST_OFFSET, GUIGrounding

#: (temperature, K) pairs of the vote
VOTES = ((0.5, 16), (0.5, 64), (1.0, 64))


def inside(p, box) -> bool:
    return box[0] <= p[0] <= box[2] and box[1] <= p[1] <= box[3]


def centre(box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def setting_bounds(task: GUIGrounding, setting: str, seeds) -> dict:
    net = task.model(setting)
    cols, rows = CELLS
    hits: dict[str, list[bool]] = {}
    ious: list[float] = []
    #: where box greedy and the first vote (learned boxes) disagree: who is right, and where a wrong vote lands
    disagree = {"vote right": 0, "greedy right": 0, "wrong vote between elements": 0}

    def add(name, value):
        hits.setdefault(name, []).append(bool(value))

    for seed in seeds:
        examples, thumbs = task.data(seed)
        with torch.no_grad():
            logits, extents = net.forward_with_boxes(image_tensor(thumbs), tokenize([e.instruction for e in examples]))
        probs = torch.softmax(logits.flatten(1).double(), 1).reshape(len(examples), rows, cols).numpy()
        greedy = greedy_digits(logits)
        gen = torch.Generator().manual_seed(derive_seed(seed, 0xB0B))
        screens = {}
        for i, ex in enumerate(examples):
            s = int(ex.id.split("-")[0])
            if s not in screens:
                screens[s] = render_screen(derive_seed(TEST_OFFSET, seed, s))
            elements = [e.box for e in screens[s].elements]
            w, h = ex.image_size
            scale = np.array([w, h, w, h], dtype=np.float64)

            def element_under(cell):
                p = ((cell % cols) + 0.5) / cols * w, ((cell // cols) + 0.5) / rows * h
                return next((b for b in elements if inside(p, b)), None)

            x, y = greedy[i].tolist()
            gcell = torch.tensor([[y * rows // 1000 * cols + x * cols // 1000]])
            learned = boxes_at(extents[i:i + 1], gcell)[0, 0].numpy() * scale
            true = element_under(int(gcell))
            add("greedy click", inside((x / 1000 * w, y / 1000 * h), ex.box))
            add("greedy, learned box", inside(centre(learned), ex.box))
            add("greedy, true box", inside(centre(true if true is not None else learned), ex.box))
            # the element holding the most mass (cells whose centres lie in its box)
            mass = [probs[i][np.ix_(*centres_in_box(b, (w, h))[::-1])].sum() for b in elements]
            add("mass oracle", tuple(elements[int(np.argmax(mass))]) == tuple(ex.box))
            for t, k in VOTES:
                cells = sample_cells(logits[i:i + 1].flatten(1), k, t, gen)
                lb = boxes_at(extents[i:i + 1], cells)[0].numpy() * scale
                under = [element_under(c) for c in cells[0].tolist()]
                tb = np.array([u if u is not None else b for u, b in zip(under, lb)], dtype=np.float64)
                point = consensus(lb, w, h).point
                add(f"vote T={t:g} K={k}, learned boxes", inside(point, ex.box))
                if (t, k) == VOTES[0] and inside(point, ex.box) != inside(centre(learned), ex.box):
                    disagree["vote right" if inside(point, ex.box) else "greedy right"] += 1
                    if not inside(point, ex.box) and not any(inside(point, b) for b in elements):
                        disagree["wrong vote between elements"] += 1
                add(f"vote T={t:g} K={k}, true boxes", inside(consensus(tb, w, h).point, ex.box))
                ious += [iou(b, u) for b, u in zip(lb, under) if u is not None]
    n = len(next(iter(hits.values())))
    return {"instructions": n, "accuracy": {k: float(np.mean(v)) for k, v in hits.items()},
            "box_iou_mean": float(np.mean(ious)), "box_iou_above_half": float(np.mean(np.array(ious) > 0.5)),
            "disagreements": disagree}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    ap.add_argument("--quick", action="store_true", help="the task's quick models and data (as in the tests)")
    ap.add_argument("--cache", type=Path, default=None, help="model cache directory (default: the user cache)")
    args = ap.parse_args(argv)
    task = GUIGrounding(cache=None if args.cache is None else ModelCache(args.cache), quick=args.quick)
    with one_thread():
        results = {s: setting_bounds(task, s, args.seeds) for s in ("boxes", "boxes-short-training")}
    report = {"command": " ".join(["python benchmarks/gui/vote_bounds.py", *(sys.argv[1:] if argv is None else argv)]),
              "seeds": args.seeds, "votes": [list(v) for v in VOTES], "results": results,
              "machine": {"platform": platform.platform(), "processor": platform.processor()},
              "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vote_bounds.json").write_text(json.dumps(report, indent=2))
    names = list(next(iter(results.values()))["accuracy"])
    lines = ["# How much can voting gain? (validation seeds of gui-grounding)", "",
             f"Command: `{report['command']}`  ", f"Seeds: {args.seeds}; machine: {report['machine']['platform']}", "",
             "Accuracy (%) over the seeds' instructions; votes and learned/true boxes use the same sampled clicks.", "",
             "| answer | " + " | ".join(results) + " |", "|---|" + "---:|" * len(results)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{100 * r['accuracy'][name]:.1f}" for r in results.values()) + " |")
    lines.append("| box IoU with the element under the click (mean) | "
                 + " | ".join(f"{r['box_iou_mean']:.2f}" for r in results.values()) + " |")
    lines.append("| boxes with IoU > 0.5 | "
                 + " | ".join(f"{100 * r['box_iou_above_half']:.0f}%" for r in results.values()) + " |")
    t, k = VOTES[0]
    lines += ["", f"Where box greedy and the T={t:g} K={k} vote (learned boxes) disagree:", "",
              "| | " + " | ".join(results) + " |", "|---|" + "---:|" * len(results)]
    for name in next(iter(results.values()))["disagreements"]:
        lines.append(f"| {name} | " + " | ".join(str(r["disagreements"][name]) for r in results.values()) + " |")
    (args.out / "vote_bounds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
