"""End-to-end GUI-RC voting time (vote grid + consensus) for K points: compressed grid vs the reference.

The reference is the published construction: one slice-add per sample on a
full-resolution grid, then connected components over the whole grid. Each
trial draws K click points (a cluster around a target plus scattered
outliers, as a sampled grounding model produces), expands them to alpha
boxes, times both constructions (median over repeats) and checks that the
answers are identical. Writes vote_speed.json and vote_speed.md beside this
script (or under --out).

    python benchmarks/gui/vote_speed.py [--k 64] [--trials 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from mmtts.strategies.region_vote import consensus, consensus_of_grid, consensus_reference, point_boxes, vote_grid_reference

SIZES = ((1920, 1080), (3840, 2160))


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def clicks(rng, w, h, k):
    target = rng.uniform(0.05, 0.95, 2) * [w, h]
    pts = rng.normal(target, [0.02 * w, 0.02 * h], (k, 2))
    out = rng.random(k) < 0.3
    pts[out] = rng.uniform(0, 1, (int(out.sum()), 2)) * [w, h]
    return pts


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=50.0)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for w, h in SIZES:
        ref_t, fast_t, add_t, label_t, same = [], [], [], [], 0
        for _ in range(args.trials):
            b = point_boxes(clicks(rng, w, h, args.k), args.alpha)
            same += consensus(b, w, h) == consensus_reference(b, w, h)
            ref_t.append(median_seconds(lambda: consensus_reference(b, w, h), args.repeats))
            fast_t.append(median_seconds(lambda: consensus(b, w, h), args.repeats))
            grid = vote_grid_reference(b, w, h)
            add_t.append(median_seconds(lambda: vote_grid_reference(b, w, h), args.repeats))
            label_t.append(median_seconds(lambda: consensus_of_grid(grid), args.repeats))
        ref, fast = float(np.median(ref_t)), float(np.median(fast_t))
        rows.append({"size": f"{w}x{h}", "k": args.k, "reference_ms": 1e3 * ref, "fast_ms": 1e3 * fast,
                     "ratio": ref / fast, "reference_grid_ms": 1e3 * float(np.median(add_t)),
                     "reference_consensus_ms": 1e3 * float(np.median(label_t)),
                     "identical_answers": f"{same}/{args.trials}"})
    result = {"command": " ".join(["python benchmarks/gui/vote_speed.py", *argv]),
              "machine": {"platform": platform.platform(), "processor": platform.processor()},
              "alpha": args.alpha, "trials": args.trials, "repeats": args.repeats, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vote_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# GUI-RC voting time, K = %d, alpha = %g" % (args.k, args.alpha), "",
             f"Median over {args.trials} random click sets (median of {args.repeats} repeats each), "
             "one CPU thread; the reference is one slice-add per sample on the full grid plus "
             "connected components over the whole grid.", "",
             "| screen | reference (ms) | of which grid | of which consensus | compressed (ms) | ratio | identical |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['reference_ms']:.2f} | {r['reference_grid_ms']:.2f} | "
                     f"{r['reference_consensus_ms']:.2f} | {r['fast_ms']:.3f} | {r['ratio']:.0f}x | "
                     f"{r['identical_answers']} |")
    (out / "vote_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
