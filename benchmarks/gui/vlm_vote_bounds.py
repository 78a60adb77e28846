"""Does the VLM's greedy answer depart from its own consensus? Bounds for voting on the gui-grounding-vlm model.

For each validation instruction (seeds 100-102 of ``gui-grounding-vlm``,
never in the reported table) this draws ``--samples`` answers at each
temperature from the cached VLM and measures:

- ``greedy``: the greedy answer's accuracy and the element it lands on;
- ``mode``: the element that holds the most samples (the limit of
  element-level voting as the number of samples grows, estimated from the
  draws), and whether greedy lands on it;
- ``vote K``: GUI-RC region voting (alpha = 50 px squares for clicks, a box
  answer as itself) over the first K of the same samples;
- ``overlap K``: a whole-answer vote over the same K samples: the answer
  (its box, or its 50 px square) with the largest summed IoU with the
  others, scored by its centre;
- ``point a=A K``: GUI-RC over the same K samples with every answer reduced
  to its point (a box answer to its centre) and voting as a click, a square
  of side A px, for A in ``ALPHAS``: the click vote at other square sizes
  for the click model, the *centre vote* for the box model;
- in the prompts where greedy and the mode disagree, how often each is right;
- how many samples lie on no element, and for each vote, how often its
  answer lies on the mode element and how often on no element.

An answer's element is the smallest element holding its point (a box
answer's centre). ``--answer box`` measures the model that answers with
the element's box (the ``vlm-box-*`` settings) and writes
vlm_vote_bounds_box.{json,md}.

Voting can gain over greedy only where greedy departs from the mode and the
mode is right more often than greedy there; this prints how often that is.
Every accuracy is also kept per seed, and the markdown gives each
aggregation's difference to greedy paired over the seeds with its 95%
t-interval.
Writes vlm_vote_bounds.json and vlm_vote_bounds.md beside this script (or under --out).

    python benchmarks/gui/vlm_vote_bounds.py [--answer point|box] [--seeds 100 101 102] [--screens 30] [--out DIR]
                                             [--quick --cache DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np

from mmtts.bench import mean_ci95, paired_comparison, strict_json
from mmtts.core.rng import derive_seed
from mmtts.core.threads import one_thread
from mmtts.modalities.gui.elements import ElementList
from mmtts.modalities.gui.parse import parse_answers
from mmtts.modalities.gui.render import render_screen
from mmtts.strategies.region_vote import consensus, vote_boxes
from mmtts.tasks.cache import ModelCache
from mmtts.tasks.gui_grounding import TEST_OFFSET, GUIGroundingVLM

TEMPERATURES = (0.5, 1.0)
VOTES = (16, 64)
#: square sides (px) of the point votes: every answer reduced to its point (a box to its centre), voted as a click
ALPHAS = (20, 35, 50, 80)
#: the aggregations scored at each K, as named in the per-seed keys ("T=0.5/vote16", "T=0.5/point_a20_16")
AGGREGATIONS = ("vote", "overlap", *(f"point_a{a}_" for a in ALPHAS))


def element_of(point, boxes) -> int:
    """Index of the smallest element box holding ``point`` (-1: none, or no answer); ``boxes`` is a list of
    boxes or an :class:`ElementList` of them, whose rule this is."""
    elements = boxes if isinstance(boxes, ElementList) else ElementList(boxes)
    return int(elements.index_at(np.asarray(point, dtype=np.float64).reshape(1, 2))[0])


def as_point(point) -> np.ndarray:
    """A vote's answer as a float (2,) array: NaN when the vote gave none (None)."""
    return np.array((np.nan, np.nan) if point is None else point, dtype=np.float64)


def overlap_vote(boxes: np.ndarray) -> np.ndarray:
    """The centre of the box (K, 4) with the largest summed IoU with the others (NaN rows cast no vote; the
    first of equal sums); NaN when none votes."""
    b = boxes[np.isfinite(boxes).all(1)]
    if len(b) == 0:
        return np.array([np.nan, np.nan])
    j = int(np.argmax(pairwise_iou(b).sum(1)))
    return (b[j, :2] + b[j, 2:]) / 2


def pairwise_iou(b: np.ndarray) -> np.ndarray:
    """Intersection over union of every pair of finite boxes (K, 4): (K, K), 0 where both are empty."""
    lo, hi = np.maximum(b[:, None, :2], b[None, :, :2]), np.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    area = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area[:, None] + area[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def inside(p, box) -> bool:
    return bool(np.isfinite(p).all() and box[0] <= p[0] <= box[2] and box[1] <= p[1] <= box[3])


#: the setting whose model each answer format measures (the temperature comes from TEMPERATURES)
SETTING = {"point": "vlm-t0.5", "box": "vlm-box-t0.5"}


def measure(task: GUIGroundingVLM, seeds, samples: int, answer: str = "point") -> dict:
    counts = {"n": 0, "greedy": 0, "parsed_greedy": 0, "greedy_off": 0}
    per_t = {t: {"mode": 0, "greedy_on_mode": 0, "disagree": 0, "greedy_right_when_disagree": 0,
                 "mode_right_when_disagree": 0, "parse_rate": 0.0, "off_element": 0.0,
                 **{f"{m}{k}{on}": 0 for m in AGGREGATIONS for k in VOTES for on in ("", "_on_mode", "_off")}}
             for t in TEMPERATURES}

    def right() -> dict:  # the answers right so far: greedy, and the mode and each vote at each temperature
        return {"greedy": counts["greedy"], **{f"T={t:g}/mode": per_t[t]["mode"] for t in TEMPERATURES},
                **{f"T={t:g}/{m}{k}": per_t[t][f"{m}{k}"] for t in TEMPERATURES for m in AGGREGATIONS
                   for k in VOTES}}

    per_seed = {key: [] for key in right()}  # accuracy of each seed's instructions, for paired intervals
    for seed in seeds:
        before = right()
        examples, pixels = task.data(seed)
        sampler, _ = task.sampler("greedy", SETTING[answer], seed)
        screens = {}
        for i, (ex, px) in enumerate(zip(examples, pixels)):
            s = int(ex.id.split("-")[0])
            if s not in screens:
                screens[s] = ElementList([el.box for el in render_screen(derive_seed(TEST_OFFSET, seed, s)).elements])
            boxes = screens[s]
            target = element_of(((ex.box[0] + ex.box[2]) / 2, (ex.box[1] + ex.box[3]) / 2), boxes)
            g = parse_answers(sampler.sample(px, ex.instruction, [0], 0.0), "permille", ex.image_size).points[0]
            counts["n"] += 1
            counts["greedy"] += inside(g, ex.box)
            counts["parsed_greedy"] += bool(np.isfinite(g).all())
            g_el = element_of(g, boxes)
            counts["greedy_off"] += g_el < 0
            for t in TEMPERATURES:
                seeds_i = [derive_seed(seed, i, j, int(t * 1000)) for j in range(samples)]
                p = parse_answers(sampler.sample(px, ex.instruction, seeds_i, t), "permille", ex.image_size)
                r = per_t[t]
                r["parse_rate"] += float(p.ok.mean())
                els = boxes.index_at(p.points)
                r["off_element"] += float((els < 0).mean())
                valid = els[els >= 0]
                mode = int(np.bincount(valid).argmax()) if len(valid) else -1
                r["mode"] += mode == target and mode >= 0
                r["greedy_on_mode"] += g_el == mode
                if g_el != mode:
                    r["disagree"] += 1
                    r["greedy_right_when_disagree"] += inside(g, ex.box)
                    r["mode_right_when_disagree"] += mode == target and mode >= 0
                for k in VOTES:
                    cast = vote_boxes(p.points[:k], p.boxes[:k], 50.0)
                    found = {"vote": consensus(cast, *ex.image_size).point, "overlap": overlap_vote(cast)}
                    for a in ALPHAS:  # every answer's point (a box's centre) as a click
                        found[f"point_a{a}_"] = consensus(vote_boxes(p.points[:k], None, a), *ex.image_size).point
                    for m, point in found.items():
                        point = as_point(point)
                        r[f"{m}{k}"] += inside(point, ex.box)
                        el = element_of(point, boxes)
                        r[f"{m}{k}_on_mode"] += mode >= 0 and el == mode
                        r[f"{m}{k}_off"] += el < 0
        now = right()
        for key in per_seed:
            per_seed[key].append((now[key] - before[key]) / len(examples))
    n = counts["n"]
    out = {"n": n, "greedy_acc": counts["greedy"] / n, "greedy_parse_rate": counts["parsed_greedy"] / n,
           "greedy_off_element": counts["greedy_off"] / n,
           "per_seed_acc": per_seed}
    for t, r in per_t.items():
        out[f"T={t:g}"] = {"mode_acc": r["mode"] / n, "greedy_on_mode": r["greedy_on_mode"] / n,
                           "disagreements": r["disagree"],
                           "greedy_right_when_disagree": r["greedy_right_when_disagree"],
                           "mode_right_when_disagree": r["mode_right_when_disagree"],
                           "parse_rate": r["parse_rate"] / n, "samples_off_element": r["off_element"] / n,
                           **{f"vote_K{k}_acc": r[f"vote{k}"] / n for k in VOTES},
                           **{f"overlap_K{k}_acc": r[f"overlap{k}"] / n for k in VOTES},
                           **{f"point_a{a}_K{k}_acc": r[f"point_a{a}_{k}"] / n for a in ALPHAS for k in VOTES},
                           **{result_key(m, k) + "_on_mode": r[f"{m}{k}_on_mode"] / n for m in AGGREGATIONS
                              for k in VOTES},
                           **{result_key(m, k) + "_off_element": r[f"{m}{k}_off"] / n for m in AGGREGATIONS
                              for k in VOTES}}
    out["paired_to_greedy"] = {key: paired_comparison(acc, per_seed["greedy"])
                               for key, acc in per_seed.items() if key != "greedy"}
    return out


def result_key(m: str, k: int) -> str:
    """The name an aggregation of ``AGGREGATIONS`` at K samples has in the results ("vote_K16", "point_a20_K16")."""
    return f"{m.rstrip('_')}_K{k}"


def aggregation_name(m: str, answer: str) -> str:
    """How the markdown names an aggregation key of ``AGGREGATIONS`` (or ``mode``)."""
    if m.startswith("point_a"):
        return f"{'centre' if answer == 'box' else 'click'} vote, alpha = {m[len('point_a'):-1]} px"
    return {"vote": "region vote (GUI-RC)" + (", boxes as they are" if answer == "box" else ", alpha = 50 px"),
            "overlap": "overlap vote", "mode": "mode (true element boxes, from every sample)"}[m]


def paired_table(res: dict, answer: str) -> list[str]:
    """Rows of each aggregation's accuracy and its difference to greedy paired over the seeds (points, 95%
    t-interval; bold where it excludes 0)."""
    seeds = len(res["per_seed_acc"]["greedy"])
    g, g_half = mean_ci95(res["per_seed_acc"]["greedy"])

    def cell(key: str) -> str:
        acc = res["per_seed_acc"][key]
        if seeds < 2:
            return f"{100 * np.mean(acc):.1f}"
        d = res["paired_to_greedy"][key]
        text = f"{100 * d['diff']:+.1f} ± {100 * d['diff_ci95']:.1f}"
        return f"{100 * np.mean(acc):.1f} | " + (f"**{text}**" if d["significant"] else text)

    head = " | ".join(f"K = {k}" + ("" if seeds < 2 else f" | K = {k} - greedy") for k in VOTES) \
        + "".join(f" | {where}, K = " + " / ".join(map(str, VOTES)) for where in ("on the mode element",
                                                                                 "on no element"))
    lines = [f"Accuracy (%, mean of {seeds} seeds) and its difference to greedy in points, paired over the seeds "
             f"(mean ± 95% t-interval, bold where it excludes 0); greedy {100 * g:.1f}"
             + ("" if seeds < 2 else f" ± {100 * g_half:.1f}") + ":", "",
             f"| T | aggregation | {head} |", "|---:|---|" + "---:|" * (len(VOTES) * (1 if seeds < 2 else 2) + 2)]
    for t in TEMPERATURES:
        per_k = 1 if seeds < 2 else 2  # cells per K
        lines.append(f"| {t:g} | {aggregation_name('mode', answer)} | {cell(f'T={t:g}/mode')} |"
                     + " |" * (per_k * (len(VOTES) - 1) + 2))
        r = res[f"T={t:g}"]
        for m in AGGREGATIONS:
            where = [" / ".join(f"{100 * r[result_key(m, k) + suffix]:.1f}%" for k in VOTES)
                     for suffix in ("_on_mode", "_off_element")]
            lines.append(f"| {t:g} | {aggregation_name(m, answer)} | "
                         + " | ".join(cell(f"T={t:g}/{m}{k}") for k in VOTES) + f" | {' | '.join(where)} |")
    return lines


def markdown(res: dict, samples: int, seeds, answer: str = "point") -> str:
    model = "gui-grounding-vlm model" + (" answering with boxes" if answer == "box" else "")
    which = "validation seeds" if min(seeds) >= 100 else "seeds"
    lines = [f"# Voting bounds on the {model} ({which} {list(seeds)}, {res['n']} "
             f"instructions, {samples} samples per temperature)", "",
             f"greedy accuracy {100 * res['greedy_acc']:.1f}% (parsed {100 * res['greedy_parse_rate']:.1f}%, "
             f"on no element {100 * res['greedy_off_element']:.1f}%)", "",
             "| T | mode accuracy | greedy on the mode | disagreements | greedy right there | mode right there | "
             + " | ".join(f"vote K={k}" for k in VOTES) + " | "
             + " | ".join(f"overlap K={k}" for k in VOTES) + " | parse rate | samples on no element |",
             "|---:|---:|---:|---:|---:|---:|" + "---:|" * (2 * len(VOTES)) + "---:|---:|"]
    for t in TEMPERATURES:
        r = res[f"T={t:g}"]
        lines.append(f"| {t:g} | {100 * r['mode_acc']:.1f}% | {100 * r['greedy_on_mode']:.1f}% | "
                     f"{r['disagreements']} | {r['greedy_right_when_disagree']} | {r['mode_right_when_disagree']} | "
                     + " | ".join(f"{100 * r[f'vote_K{k}_acc']:.1f}%" for k in VOTES) + " | "
                     + " | ".join(f"{100 * r[f'overlap_K{k}_acc']:.1f}%" for k in VOTES)
                     + f" | {100 * r['parse_rate']:.1f}% | {100 * r['samples_off_element']:.1f}% |")
    return "\n".join(lines + [""] + paired_table(res, answer)) + "\n"


def sweep_args(argv, description: str, answer: str, seeds: list[int], screens: int, samples: int,
               out: str) -> argparse.Namespace:
    """The command line of a validation sweep over the VLM's answers (the defaults given), checked."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--answer", choices=tuple(SETTING), default=answer, help="the click model or the box model")
    ap.add_argument("--seeds", type=int, nargs="+", default=seeds)
    ap.add_argument("--screens", type=int, default=screens, help="screens per seed (three instructions each)")
    ap.add_argument("--samples", type=int, default=samples, help="answers drawn per temperature")
    ap.add_argument("--out", default=out)
    ap.add_argument("--quick", action="store_true", help="the quick models (for tests)")
    ap.add_argument("--cache", default=None, help="model cache directory")
    args = ap.parse_args(argv)
    if args.samples < max(VOTES):
        ap.error(f"--samples must be at least {max(VOTES)} (the largest vote)")
    return args


def run_sweep(args: argparse.Namespace, measure) -> dict:
    """``measure(task, seeds, samples, answer)`` on one thread, with the sweep's settings added to its result."""
    task = GUIGroundingVLM(cache=ModelCache(args.cache) if args.cache else None, quick=args.quick,
                           screens=args.screens)
    with one_thread():
        res = measure(task, args.seeds, args.samples, args.answer)
    res.update(seeds=args.seeds, samples=args.samples, screens=args.screens, machine=platform.machine())
    return res


def main(argv=None) -> dict:
    args = sweep_args(argv, __doc__.splitlines()[0], "point", [100, 101, 102], 30, 128, str(Path(__file__).parent))
    res = run_sweep(args, measure)
    if args.answer != "point":
        res["answer"] = args.answer
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "vlm_vote_bounds" + ("" if args.answer == "point" else f"_{args.answer}")
    text = markdown(res, args.samples, args.seeds, args.answer)
    (out / f"{name}.json").write_text(json.dumps(strict_json(res), indent=2) + "\n")
    (out / f"{name}.md").write_text(text)
    print(text)
    return res


if __name__ == "__main__":
    main()
