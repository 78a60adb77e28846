"""How the K = 16 / K = 1 latency ratio of the RoboMonkey wrapper depends on the cost of the policy's forward.

The wrapper draws the N policy samples of a step in one policy call (one
row per sample) and scores all K candidates in one verifier call, so a step
at K = 16 pays one policy call plus a fixed extra (the Gaussian step,
de-duplication, the verifier over K rows, selection). Its time over the single-sample step should
then approach 1 + extra / policy as the policy grows. Run one by one (K
single-sample policy calls, each candidate scored alone), the ratio would
approach K instead.

Each policy is the vla-mujoco benchmark's trained policy (a ``GaussianMLP``,
width 128). The slower ones are the same policy with a wider trunk beside it:
a randomly initialised ``GaussianMLP`` of width w runs on the same state in
every forward, and its output is added times zero, so the forward costs the
trained policy plus a width-w MLP while the actions, and with them the
episodes, the candidates and all the work after the policy call, stay exactly
the trained policy's. Only the cost of the forward changes between rows.
The verifier is the benchmark's trained verifier, unchanged. Every run is
Reacher-v5 episodes on one thread, timed as the benchmark times them
(``VLAMujoco._episodes``: the median of the wrapper's ``seconds["total"]``
over the control steps, the environment excluded). One warm-up episode per
policy and mode, whose policy and verifier calls are counted; then
``--repeats`` rounds, each running every policy at K = 1, at K = 16 and one by
one on the same episodes; the tables give the median over rounds and the
min-max spread. Writes latency.json, latency.md and latency.png beside this
script (or under --out).

    python benchmarks/vla/latency.py [--widths 256 512 1024 2048 4096] [--episodes 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmtts.bench import machine_info, versions
from mmtts.core.rng import derive_seed
from mmtts.modalities.vla import ActionVerifier, GaussianPolicy
from mmtts.modalities.vla.gym_env import GymPolicy, run_episode
from mmtts.core.threads import one_thread
from mmtts.tasks.vla_mujoco import STATE_DIM, GaussianMLP, VLAMujoco, make_env

SETTING = "in-distribution"
MODES = ("k1", "k16", "one_by_one")


class Counted(nn.Module):
    """A module that counts its calls and the rows they carry (for the warm-up episodes only)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module, self.calls, self.rows = module, 0, 0

    def forward(self, x, *rest):
        first = x if isinstance(x, torch.Tensor) else next(v for v in x.values() if isinstance(v, torch.Tensor))
        self.calls += 1
        self.rows += int(first.shape[0])
        return self.module(x, *rest)


class WideTrunk(nn.Module):
    """The trained policy plus a random width-``width`` ``GaussianMLP`` run in the same forward and added times
    zero: the forward costs both, the output is the trained policy's, bit for bit."""

    def __init__(self, policy: nn.Module, width: int):
        super().__init__()
        self.policy, self.trunk = policy, GaussianMLP(hidden=width)

    def forward(self, state: torch.Tensor):
        mean, log_std = self.policy(state)
        extra_mean, extra_log_std = self.trunk(state)
        return mean + 0.0 * extra_mean, log_std + 0.0 * extra_log_std


class OneByOne:
    """No batching: K single-sample wrapper calls (one policy forward each), each candidate scored alone,
    and the best one acted on. ``seconds`` holds the time of every control step."""

    def __init__(self, single, verifier, k: int):
        self.single, self.verifier, self.k = single, verifier, k
        self.seconds: list[float] = []

    def reset(self) -> None:
        self.single.reset()

    def select_action(self, batch) -> torch.Tensor:
        t0 = time.perf_counter()
        best, best_score = None, -float("inf")
        for _ in range(self.k):
            chunk = self.single.choose(batch)  # (1, 1, D): the policy's own sample
            score = float(self.verifier(chunk, batch)[0])
            if best is None or score > best_score:
                best, best_score = chunk, score
        self.seconds.append(time.perf_counter() - t0)
        return best[:, 0]


def episode_seeds(seed: int, episodes: int) -> list[int]:
    """The episode seeds ``VLAMujoco._episodes`` uses, so every mode sees the same episodes."""
    return [derive_seed(seed, e, 0xEE) % 2 ** 31 for e in range(episodes)]


def one_by_one_ms(task: VLAMujoco, k: int, seed: int, episodes: int) -> tuple[float, int]:
    """Median ms per control step of :class:`OneByOne` over ``episodes`` Reacher episodes, and the step count."""
    policy, verifier = task._load()
    agent = OneByOne(task.agent("policy", 1, seed), verifier, k)
    env = make_env()
    steps = sum(run_episode(env, GymPolicy(agent), seed=s)["steps"] for s in episode_seeds(seed, episodes))
    env.close()
    return 1e3 * float(np.median(agent.seconds)), steps


def run_mode(task: VLAMujoco, mode: str, k: int, seed: int, episodes: int) -> float:
    """Median ms per control step of one mode, timed as the benchmark times it."""
    if mode == "one_by_one":
        return one_by_one_ms(task, k, seed, episodes)[0]
    method, budget = ("policy", 1) if mode == "k1" else ("robomonkey", k)
    task.episodes = episodes
    return task._episodes(method, SETTING, budget, seed)["ms_per_step"]


def count_calls(task: VLAMujoco, policy: GaussianPolicy, verifier: ActionVerifier, mode: str, k: int,
                seed: int) -> dict:
    """One warm-up episode with counting policy and verifier: calls per control step and rows per call."""
    net, scorer = Counted(policy.module), Counted(verifier.scorer)
    task._models = (GaussianPolicy(net, STATE_DIM), ActionVerifier(scorer))
    if mode == "one_by_one":
        steps = one_by_one_ms(task, k, seed, 1)[1]
    else:
        method, budget = ("policy", 1) if mode == "k1" else ("robomonkey", k)
        env = make_env()
        steps = run_episode(env, GymPolicy(task.agent(method, budget, seed)), seed=episode_seeds(seed, 1)[0])["steps"]
        env.close()
    task._models = (policy, verifier)
    return {"steps": steps, "policy_calls_per_step": net.calls / steps,
            "policy_rows_per_call": net.rows / max(net.calls, 1),
            "verifier_calls_per_step": scorer.calls / steps,
            "verifier_rows_per_call": scorer.rows / max(scorer.calls, 1)}


def forward_ms(policy: GaussianPolicy, calls: int, seed: int) -> float:
    """Median ms of one policy call (one observation, one sample), outside the loop, after a warm-up."""
    batch = {"observation.state": torch.randn(1, STATE_DIM, generator=torch.Generator().manual_seed(seed))}
    g = torch.Generator().manual_seed(seed)
    for _ in range(max(calls // 10, 3)):
        policy.sample_actions(batch, 1, g)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        policy.sample_actions(batch, 1, g)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def spread(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "values": v.tolist()}


def measure(policies: list[dict], verifier: ActionVerifier, *, k: int = 16, samples: int = 8, episodes: int = 4,
            repeats: int = 5, seed: int = 0, forward_calls: int = 200) -> list[dict]:
    """Latency of each policy at K = 1, at K = ``k`` (N = ``samples``) and one by one.

    ``policies``: dicts with ``label``, ``width`` (of the added trunk, 0 for
    none) and ``module`` (state -> (mean, log_std), as ``GaussianMLP``). Returns one
    row per policy with the forward time, the median ms per step of every mode
    over ``repeats`` rounds (with min and max), the ratios to K = 1 and the
    calls counted in the warm-up episodes.
    """
    task = VLAMujoco(episodes=episodes, samples=samples)
    wrapped = [GaussianPolicy(p["module"].eval(), STATE_DIM) for p in policies]
    rows = []
    with one_thread():
        for p, policy in zip(policies, wrapped):
            task._models = (policy, verifier)
            calls = {mode: count_calls(task, policy, verifier, mode, k, seed) for mode in MODES}
            rows.append({"label": p["label"], "trunk_width": p["width"],
                         "parameters": sum(t.numel() for t in p["module"].parameters()),
                         "forward_ms": forward_ms(policy, forward_calls, seed), "calls": calls,
                         "times": {mode: [] for mode in MODES}})
        for _ in range(repeats):  # rounds: every policy and mode once per round, so slow phases hit all of them
            for row, policy in zip(rows, wrapped):
                task._models = (policy, verifier)
                for mode in MODES:
                    row["times"][mode].append(run_mode(task, mode, k, seed, episodes))
    for row in rows:
        t = {m: np.asarray(row["times"][m]) for m in MODES}
        for m in MODES:
            row[f"{m}_ms"] = spread(t[m])
        row["ratio"] = spread(t["k16"] / t["k1"])  # paired within a round
        row["one_by_one_ratio"] = spread(t["one_by_one"] / t["k1"])
        row["extra_ms"] = spread(t["k16"] - t["k1"])
        row["k1_overhead_ms"] = spread(t["k1"] - row["forward_ms"])  # the single-sample step beyond the forward
        del row["times"]
    return rows


def summarise(rows: list[dict]) -> dict:
    """The extra ms of a K = 16 step over a K = 1 step and the K = 1 step's time beyond the forward (medians
    over all rows and rounds), the forward time at which ``1 + extra / (forward + overhead)`` is 2, and the
    one at which the measured ratio crosses 2."""
    extra = float(np.median([v for r in rows for v in r["extra_ms"]["values"]]))
    overhead = float(np.median([v for r in rows for v in r["k1_overhead_ms"]["values"]]))
    return {"extra_ms": extra, "k1_overhead_ms": overhead, "model_crossing_forward_ms": extra - overhead,
            "crossing_forward_ms": crossing(rows)}


def crossing(rows: list[dict], level: float = 2.0) -> float | None:
    """Forward time at which the measured ratio first falls to ``level``: linear in log forward time
    between the two neighbouring widths (None when no neighbouring pair brackets it)."""
    pts = sorted((r["forward_ms"], r["ratio"]["median"]) for r in rows)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if y0 > level >= y1:
            f = (y0 - level) / (y0 - y1)
            return float(np.exp(np.log(x0) + f * (np.log(x1) - np.log(x0))))
    return None


def plot(rows: list[dict], extra_ms: float, overhead_ms: float, k: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["forward_ms"])
    x = np.array([r["forward_ms"] for r in rows])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for key, name, marker in (("ratio", f"wrapper, K = {k} (batched)", "o"),
                              ("one_by_one_ratio", f"{k} candidates one by one", "s")):
        y = np.array([r[key]["median"] for r in rows])
        err = np.array([[r[key]["median"] - r[key]["min"] for r in rows],
                        [r[key]["max"] - r[key]["median"] for r in rows]])
        ax.errorbar(x, y, yerr=err, marker=marker, capsize=3, label=name)
    grid = np.geomspace(x.min() * 0.8, x.max() * 1.25, 100)
    ax.plot(grid, 1 + extra_ms / (grid + overhead_ms), "k:",
            label=f"1 + {extra_ms:.2f} / (forward + {overhead_ms:.2f}) ms")
    ax.axhline(2.0, color="grey", lw=0.8, ls="--")
    ax.axhline(float(k), color="grey", lw=0.8, ls="--")
    for r in rows:
        ax.annotate(str(r["trunk_width"] or "trained"), (r["forward_ms"], r["ratio"]["median"]),
                    textcoords="offset points", xytext=(4, -12), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("policy forward (ms, one observation, one thread)")
    ax.set_ylabel("ms per step / ms per step at K = 1")
    ax.set_title("RoboMonkey wrapper on Reacher-v5: latency ratio vs policy cost", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    a = result["settings"]
    lines = ["# vla-mujoco latency: K = %d against K = 1 as the policy grows" % a["k"], "",
             f"Command: `{result['command']}`  ",
             f"Created: {result['created']}  ",
             f"Machine: {result['machine']['platform']}, {result['machine']['cpu_count']} CPUs, one torch thread  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v) + "  ",
             f"Seed: {a['seed']} (episode seeds as the benchmark derives them; each trunk initialised from "
             f"torch seed derive_seed({a['seed']}, width))", "",
             f"Reacher-v5, {a['episodes']} episodes ({a['episodes'] * 50} control steps) per run, one thread; "
             f"ms per step is the median of the wrapper's step time over the run (environment excluded), then the "
             f"median over {a['repeats']} rounds with [min, max]. K = 1 is the wrapper at N = K = 1; "
             f"K = {a['k']} is N = {a['samples']}, K = {a['k']}, as in the benchmark; one by one is {a['k']} "
             f"single-sample wrapper calls per step, each action scored by its own verifier call. Ratios are "
             "paired within a round. `forward` is one policy call on one observation outside the loop. "
             "Every row acts with the benchmark's trained policy; `+ trunk w` adds a randomly initialised "
             "GaussianMLP of width w to each forward, its output multiplied by zero, so only the forward's "
             "cost changes (same actions, episodes and candidates). The verifier is the benchmark's trained "
             "one throughout.", "",
             f"| policy | forward (ms) | K = 1 (ms) | K = {a['k']} (ms) | ratio | one by one (ms) | one-by-one ratio "
             "| policy calls per step (K = 1 / K = 16 / one by one) | verifier calls per step (rows per call) |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in result["rows"]:
        c = r["calls"]
        lines.append(
            f"| {r['label']} | {r['forward_ms']:.3f} | {fmt(r['k1_ms'])} | {fmt(r['k16_ms'])} | "
            f"{fmt(r['ratio'], 2, 'x')} | "
            f"{fmt(r['one_by_one_ms'])} | {fmt(r['one_by_one_ratio'], 1, 'x')} | "
            f"{c['k1']['policy_calls_per_step']:g} / {c['k16']['policy_calls_per_step']:g} / "
            f"{c['one_by_one']['policy_calls_per_step']:g} | "
            f"{c['k16']['verifier_calls_per_step']:g} ({c['k16']['verifier_rows_per_call']:g}) at K = {a['k']}, "
            f"{c['one_by_one']['verifier_calls_per_step']:g} ({c['one_by_one']['verifier_rows_per_call']:g}) "
            "one by one |")
    s = result["summary"]
    lines += ["", f"Extra time of a K = {a['k']} step over a K = 1 step (median over policies and rounds): "
              f"{s['extra_ms']:.3f} ms; a K = 1 step costs the forward plus {s['k1_overhead_ms']:.3f} ms. "
              f"So the ratio is about 1 + {s['extra_ms']:.2f} / (forward + {s['k1_overhead_ms']:.2f}) ms, "
              f"2x at a forward of {s['model_crossing_forward_ms']:.2f} ms. The measured ratio falls to 2x at "
              + (f"about {s['crossing_forward_ms']:.2f} ms" if s["crossing_forward_ms"] else "no measured point")
              + " (interpolated in log forward time between neighbouring rows)."]
    return "\n".join(lines) + "\n"


def fmt(s: dict, digits: int = 3, unit: str = "") -> str:
    return f"{s['median']:.{digits}f}{unit} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 512, 768, 1024, 1536, 2048, 4096],
                    help="widths of the random trunks added to the trained policy (which also runs alone)")
    ap.add_argument("--k", type=int, default=16, help="candidates at the large setting")
    ap.add_argument("--samples", type=int, default=8, help="policy samples N at the large setting (benchmark: 8)")
    ap.add_argument("--episodes", type=int, default=4, help="Reacher episodes (50 steps each) per timed run")
    ap.add_argument("--repeats", type=int, default=5, help="rounds over all policies and modes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)

    task = VLAMujoco()
    trained, verifier = task._load()  # the benchmark's cached policy and verifier (trained on first use)
    policies = [{"label": "trained", "width": 0, "module": trained.module}]
    for w in args.widths:
        torch.manual_seed(derive_seed(args.seed, w))
        policies.append({"label": f"trained + trunk {w}", "width": w, "module": WideTrunk(trained.module, w)})
    rows = measure(policies, verifier, k=args.k, samples=args.samples, episodes=args.episodes,
                   repeats=args.repeats, seed=args.seed)
    info = machine_info()
    with one_thread():
        info["torch_threads"] = torch.get_num_threads()
    result = {"command": " ".join(["python benchmarks/vla/latency.py", *argv]),
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": info, "versions": versions(),
              "settings": {"k": args.k, "samples": args.samples, "episodes": args.episodes, "repeats": args.repeats,
                           "seed": args.seed, "widths": args.widths, "env": "Reacher-v5", "setting": SETTING,
                           "policy": f"vla-mujoco trained GaussianMLP (width {task.policy_config['hidden']}), "
                                     "alone and with a random GaussianMLP trunk of each width added times zero",
                           "verifier": "vla-mujoco trained verifier", "threads": 1},
              "rows": rows,
              "summary": summarise(rows)}
    print(write_outputs(result, args.out))
    return result


def write_outputs(result: dict, out) -> str:
    """latency.json, latency.md and latency.png under ``out``; returns the markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (out / "latency.md").write_text(text)
    s = result["summary"]
    plot(result["rows"], s["extra_ms"], s["k1_overhead_ms"], result["settings"]["k"], out / "latency.png")
    return text


if __name__ == "__main__":
    main()
