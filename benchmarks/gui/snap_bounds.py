"""Snapping the VLM's answers to detected elements before voting: validation of the snapping settings.

For each validation instruction (seeds 100-109 of ``gui-grounding-vlm``,
never in the reported table) this draws ``--samples`` answers at each
temperature from the cached VLM and scores, per seed:

- ``greedy``: greedy decoding, as benchmarked;
- ``greedy_snapped``: greedy's answer moved to the centre of the element
  the task's element-box network detects under it (what greedy answers in
  the ``*-snap-*`` settings);
- ``mode``: the true element holding the most samples (the bound of any
  element-level vote, known only to this analysis);
- ``vote K``: GUI-RC as benchmarked (boxes as they are, clicks as 50 px
  squares) over the first K samples;
- ``snap K``: GUI-RC over the same samples with each one voting with the
  detected element under it (``region-vote`` with ``snap=True``);
- ``group K``: the detected element box that the most samples' detected
  boxes overlap with IoU > 0.5, answered by its centre (an element-level
  vote, measured for comparison).

Differences are paired over the seeds, against greedy and against the
snapped greedy. Writes snap_bounds{,_box}.{json,md} under --out.

    python benchmarks/gui/snap_bounds.py [--answer point|box] [--seeds 100 ... 109] [--screens 20] [--out DIR]
                                         [--quick --cache DIR]
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from mmtts.bench import mean_ci95, paired_comparison, strict_json
from mmtts.core.rng import derive_seed
from mmtts.modalities.gui.elements import ElementList
from mmtts.modalities.gui.parse import parse_answers
from mmtts.modalities.gui.render import render_screen
from mmtts.strategies.region_vote import consensus, snapped_vote_boxes, vote_boxes
from mmtts.tasks.gui_grounding import TEST_OFFSET, GUIGroundingVLM

_spec = importlib.util.spec_from_file_location("vlm_vote_bounds", Path(__file__).with_name("vlm_vote_bounds.py"))
_bounds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bounds)
as_point, element_of, inside = _bounds.as_point, _bounds.element_of, _bounds.inside

TEMPERATURES = (0.5, 1.0)
VOTES = (16, 64)
#: the snapping setting of each answer format (its model; the temperature comes from TEMPERATURES)
SETTING = {"point": "vlm-snap-t0.5", "box": "vlm-box-snap-t0.5"}


def group_vote(boxes: np.ndarray) -> np.ndarray:
    """The centre of the box (K, 4) that the most boxes overlap with IoU > 0.5 (the first of equal counts);
    NaN when no row is finite."""
    b = boxes[np.isfinite(boxes).all(1)]
    if len(b) == 0:
        return np.array([np.nan, np.nan])
    j = int(np.argmax((_bounds.pairwise_iou(b) > 0.5).sum(1)))
    return (b[j, :2] + b[j, 2:]) / 2


def measure(task: GUIGroundingVLM, seeds, samples: int, answer: str) -> dict:
    setting = SETTING[answer]
    keys = ["greedy", "greedy_snapped"] + [f"T={t:g}/{m}" for t in TEMPERATURES for m in
                                           ["mode", *(f"{v}{k}" for v in ("vote", "snap", "group") for k in VOTES)]]
    per_seed = {k: [] for k in keys}
    n = 0
    for seed in seeds:
        examples, pixels = task.data(seed)
        sampler, _ = task.sampler("greedy", setting, seed)
        right = dict.fromkeys(keys, 0)
        screens = {}
        for i, (ex, px) in enumerate(zip(examples, pixels)):
            s = int(ex.id.split("-")[0])
            if s not in screens:
                screens[s] = ElementList([el.box for el in render_screen(derive_seed(TEST_OFFSET, seed, s)).elements])
            boxes, elements = screens[s], task.elements(setting, ex)
            target = element_of(((ex.box[0] + ex.box[2]) / 2, (ex.box[1] + ex.box[3]) / 2), boxes)
            g = parse_answers(sampler.sample(px, ex.instruction, [0], 0.0), "permille", ex.image_size).points
            right["greedy"] += inside(g[0], ex.box)
            right["greedy_snapped"] += inside(elements.snap(g)[0], ex.box)
            for t in TEMPERATURES:
                draws = [derive_seed(seed, i, j, int(t * 1000)) for j in range(samples)]
                p = parse_answers(sampler.sample(px, ex.instruction, draws, t), "permille", ex.image_size)
                els = boxes.index_at(p.points)
                valid = els[els >= 0]
                mode = int(np.bincount(valid).argmax()) if len(valid) else -1
                right[f"T={t:g}/mode"] += mode == target and mode >= 0
                found = elements.boxes_at(p.points)
                for k in VOTES:
                    plain = consensus(vote_boxes(p.points[:k], p.boxes[:k], 50.0), *ex.image_size)
                    snapped = consensus(snapped_vote_boxes(p.points[:k], p.boxes[:k], found[:k], 50.0),
                                        *ex.image_size)
                    right[f"T={t:g}/vote{k}"] += inside(as_point(plain.point), ex.box)
                    right[f"T={t:g}/snap{k}"] += inside(as_point(snapped.point), ex.box)
                    right[f"T={t:g}/group{k}"] += inside(group_vote(found[:k]), ex.box)
        for key in keys:
            per_seed[key].append(right[key] / len(examples))
        n += len(examples)
    out = {"n": n, "per_seed_acc": per_seed, "acc": {k: float(np.mean(v)) for k, v in per_seed.items()}}
    out["paired"] = {base: {k: paired_comparison(v, per_seed[base]) for k, v in per_seed.items() if k != base}
                     for base in ("greedy", "greedy_snapped")}
    return out


def markdown(res: dict, seeds, samples: int, answer: str) -> str:
    model = "click model" if answer == "point" else "box model"
    lines = [f"# Snapped voting on the gui-grounding-vlm {model} (seeds {list(seeds)}, {res['n']} instructions, "
             f"{samples} samples per temperature)", "",
             "Accuracy (%, mean of the seeds) and differences in points paired over the seeds (mean ± 95% "
             "t-interval, bold where it excludes 0).", "",
             "| answer | accuracy | - greedy | - snapped greedy |", "|---|---:|---:|---:|"]

    def diff(key: str, base: str) -> str:
        if key == base:
            return ""
        d = res["paired"][base].get(key)
        if d is None or not np.isfinite(d["diff_ci95"]):
            return "" if d is None else f"{100 * d['diff']:+.1f}"
        text = f"{100 * d['diff']:+.1f} ± {100 * d['diff_ci95']:.1f}"
        return f"**{text}**" if d["significant"] else text

    names = {"mode": "mode (true elements)", "vote": "GUI-RC as benchmarked", "snap": "GUI-RC, snapped",
             "group": "element-group vote, snapped"}
    for key in res["per_seed_acc"]:
        if key.startswith("T="):
            t, m = key.split("/")
            kind = m.rstrip("0123456789")
            label = f"{t}, {names[kind]}" + (f", K = {m[len(kind):]}" if m != kind else "")
        else:
            label = {"greedy": "greedy", "greedy_snapped": "greedy, snapped"}[key]
        acc, half = mean_ci95(res["per_seed_acc"][key])
        lines.append(f"| {label} | {100 * acc:.1f} | {diff(key, 'greedy')} | {diff(key, 'greedy_snapped')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = _bounds.sweep_args(argv, __doc__.splitlines()[0], "box", list(range(100, 110)), 20, 64,
                              str(Path(__file__).parent / "validation-snap"))
    res = _bounds.run_sweep(args, measure)
    res["answer"] = args.answer
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "snap_bounds" + ("" if args.answer == "point" else "_box")
    (out / f"{name}.json").write_text(json.dumps(strict_json(res), indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(res, args.seeds, args.samples, args.answer))
    print((out / f"{name}.md").read_text())
    return res


if __name__ == "__main__":
    main()
