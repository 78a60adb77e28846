"""One image-search search at population n, timed, in one process or in each rank of a launched group.

Run by ``measure.py``: ``python search_worker.py OUT.json`` (one process) or
``accelerate launch --multi_gpu --num_processes 2 search_worker.py OUT.json``.
Rank 0 writes the wall and CPU seconds of each repeat (its own CPU time: the
work of one rank), the bytes its collectives moved per
operation, and a digest of each Result (to prove the ranks and the single
process chose the same outputs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import torch


def digest(res) -> str:
    h = hashlib.sha256()
    for t in (res.outputs, res.scores, res.lineage["ids"], res.lineage["parents"]):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps([(p["nfe"], p["verifier_calls"], p["scores"]) for p in res.trace]).encode())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--methods", nargs="+", default=["best-of-n", "particle-filter"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="the full models (20 steps, wider UNet), not the quick ones")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import mmtts
    from mmtts.core.registry import STRATEGIES
    from mmtts.core.strategy import run_strategy
    from mmtts.distributed.comm import launched_world_size, traffic
    from mmtts.tasks.image_search import digit_verifiers, to_unit

    world = launched_world_size()
    task = mmtts.create_task("image-search", quick=not args.full)
    models = task.models()
    reward, _ = digit_verifiers(models, args.seed % 10, to_unit)
    settings = {"best-of-n": {"n": args.n, "batch_size": args.n},
                "particle-filter": {"n": args.n, "lmbda": 1.0, "potential": "max"}}
    report = {"world": world, "n": args.n, "steps": task.steps, "models": "full" if args.full else "quick",
              "methods": {}}
    for method in args.methods:
        process = task.process(method)
        budget = args.n * process.nfe_per_candidate()
        run = lambda: run_strategy(STRATEGIES.create(method, **settings[method]), process, reward, budget,  # noqa
                                   seed=args.seed, distributed=world > 1)
        run()  # warm-up: first-call costs (allocations, gloo buffers) are not the steady state
        traffic(reset=True)
        seconds, cpu, digests = [], [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            res = run()
            seconds.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            digests.append(digest(res))
        moved = traffic(reset=True)
        report["methods"][method] = {"budget_nfe": budget, "seconds": seconds, "cpu_seconds": cpu, "digests": digests,
                                     "stages": task.steps, "traffic_per_search": {
                                         k: {op: v / args.repeats for op, v in d.items()}
                                         for k, d in moved.items()}}
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
