"""CPU time of one RoboMonkeyPolicy control step at K = 16 (N = 8) and at K = 1, for whichever mmtts is importable.

The policy and verifier have the vla-mujoco benchmark's sizes (a width-128
``GaussianMLP`` head and the benchmark's verifier, folded) with random
weights, so nothing needs training; observations are random states. Each
round builds fresh wrappers and times ``select_action`` with the thread's
CPU time (which other jobs on a busy machine disturb less than wall time):
the median over ``--steps`` steps after 50 warm-up steps. To compare two
versions of the code in one session, export each into its own directory and
alternate rounds::

    git archive <rev> mmtts | tar -x -C /tmp/rev   # one directory per version
    PYTHONPATH=/tmp/rev python benchmarks/vla/step_time.py --rounds 1

Prints one JSON line: ms per step at K = 1 and K = 16, one value per round.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from mmtts.modalities.vla import ActionSpace, ActionVerifier, GaussianPolicy, RoboMonkeyPolicy
from mmtts.tasks import vla_mujoco as V


def wrapper(policy, verifier, space, k: int, n: int) -> RoboMonkeyPolicy:
    try:
        return RoboMonkeyPolicy(policy, verifier, space, n=k, policy_samples=n, seed=0)
    except TypeError:  # versions that named the counts num_candidates and num_samples
        return RoboMonkeyPolicy(policy, verifier, space, num_candidates=k, num_samples=n, seed=0)


def step_ms(agent: RoboMonkeyPolicy, observations: list, steps: int, warmup: int = 50) -> float:
    """Median thread CPU ms of ``select_action`` over ``steps`` steps (50-step episodes)."""
    times = []
    for i in range(warmup + steps):
        t0 = time.thread_time()
        agent.select_action(observations[i % len(observations)])
        times.append(time.thread_time() - t0)
        if i % 50 == 49:
            agent.reset()
    return 1e3 * float(np.median(times[warmup:]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=350)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = V.GaussianMLP(hidden=V.POLICY_CONFIG["hidden"]).eval()
    scorer = V.make_scorer(V.VERIFIER_CONFIG).eval()
    scorer = scorer.folded() if hasattr(scorer, "folded") else scorer
    policy, verifier = GaussianPolicy(net, V.STATE_DIM), ActionVerifier(scorer)
    space = ActionSpace.box(-1.0, 1.0, dim=V.ACTION_DIM)
    g = torch.Generator().manual_seed(1)
    observations = [{"observation.state": torch.randn(1, V.STATE_DIM, generator=g)} for _ in range(50)]
    out = {"k1_ms": [], "k16_ms": []}
    for _ in range(args.rounds):
        out["k1_ms"].append(step_ms(wrapper(policy, verifier, space, 1, 1), observations, args.steps))
        out["k16_ms"].append(step_ms(wrapper(policy, verifier, space, 16, 8), observations, args.steps))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
