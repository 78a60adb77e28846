"""Benchmark runner: methods x budgets x paired seeds -> results JSON, a markdown table and plots.

Every method runs at the same budgets on the same seeds (seed s gives every
method the same data and the same root random stream), so differences are
paired. A row reports the mean over seeds with a 95% t-interval; each method
is compared with the task's baseline at equal budget by the paired difference
and its interval, and called significant only when that interval excludes 0.
Timings and memory are kept out of ``rows`` so that the same seeds give
identical rows.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
from scipy import stats

from .core.errors import MmttsError
from .tasks.base import Task

VERSION_PACKAGES = ("mmtts", "torch", "torchvision", "numpy", "scipy", "scikit-learn", "diffusers", "transformers",
                    "timm", "open-clip-torch", "triton", "matplotlib")


def machine_info() -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpu_count": os.cpu_count()}
    try:
        import torch
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # torch missing or broken: report what we can
        info["cuda"] = None
    return info


def versions() -> dict:
    out = {}
    for pkg in VERSION_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def mean_ci95(values) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval (NaN for a single value: one seed gives no interval)."""
    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean())
    if v.size < 2:
        return m, float("nan")
    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return m, half


def paired_comparison(a, b) -> dict:
    """Paired difference a - b over seeds: mean, 95% interval, p-value, and whether it excludes zero."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    m, half = mean_ci95(d)
    if d.size < 2:
        p = float("nan")
    elif np.allclose(d, d[0]):
        p = 0.0 if d[0] != 0 else 1.0
    else:
        p = float(stats.ttest_1samp(d, 0.0).pvalue)
    significant = bool(d.size >= 2 and (m - half > 0 or m + half < 0))
    return {"diff": m, "diff_ci95": half, "p_value": p, "significant": significant}


def interval(half: float | None) -> str:
    """A half-width for tables: "n/a" where there is none (one seed)."""
    return "n/a" if half is None or not np.isfinite(half) else f"{half:.2g}"


def strict_json(x):
    """``x`` with every NaN or infinite float replaced by None, so the JSON is strict (no bare NaN)."""
    if isinstance(x, float):
        return x if np.isfinite(x) else None
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    return x


def check_out_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` and prove it writable before any work is done, so a long sweep is never lost at the end."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise MmttsError(f"--out {str(out)!r} is a file, not a directory; pass a directory for the results")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".mmtts-write-check-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise MmttsError(f"cannot write results to --out {str(out)!r} ({e.strerror or e}); "
                         "pass a directory you can write to") from None
    return path


def _check_sweep(task: Task, seeds, budgets, settings, methods):
    methods = list(methods or task.methods)
    for m in methods:
        task.check_method(m)
    settings = list(settings or task.settings)
    for st in settings:
        task.check_setting(st)
    if not seeds:
        raise MmttsError("no seeds given; pass --seeds 0 1 2 (at least two for confidence intervals)")
    if len(set(seeds)) != len(seeds):
        raise MmttsError(f"seeds {seeds} repeat a value; paired seeds must be distinct")
    if task.budget_unit is None:
        if budgets:
            raise MmttsError(f"task {task.name!r} has no budget sweep; drop --budgets")
        budgets = [None]
    else:
        if not budgets:
            raise MmttsError("no budgets given; pass --budgets with at least one positive value")
        bad = [b for b in budgets if int(b) != b or b <= 0]
        if bad:
            raise MmttsError(f"budgets {bad} must be positive whole numbers of {task.budget_unit}")
        budgets = sorted(int(b) for b in budgets)
    return list(seeds), budgets, settings, methods


def sweep_cells(settings: list[str], methods: list[str], budgets: list, seeds: list[int]) -> list[tuple]:
    """Every (setting, method, budget, seed) run of a sweep, in the order of the rows."""
    return [(st, m, b, s) for st in settings for m in methods for b in budgets for s in seeds]


def run_benchmark(task: Task, seeds: list[int], budgets: list[int] | None, methods: list[str] | None = None,
                  out: str | os.PathLike | None = None, command: str | None = None,
                  settings: list[str] | None = None, resume: bool = False) -> dict | None:
    """Run the sweep and, when ``out`` is given, write ``<task>.json``, ``<task>.md`` and ``<task>.png`` there.

    With ``out``, each finished cell is saved under ``<out>/<task>.cells/`` and ``resume=True`` runs only the
    missing ones. Under ``accelerate launch`` the cells are shared out over the processes
    (:mod:`mmtts.distributed.cells`); rank 0 writes the results and returns them, the other ranks return None.
    """
    from .distributed.cells import CellStore, run_cells
    from .distributed.comm import launched_world_size
    seeds, budgets, settings, methods = _check_sweep(task, seeds, budgets, settings, methods)
    if out is not None:
        check_out_dir(out)
    cells = sweep_cells(settings, methods, budgets, seeds)
    store = CellStore(out, task.name, task.describe()) if out is not None else None
    done = run_cells(cells, lambda c: task.run(c[1], c[0], c[2], c[3]), task.prepare, store, resume,
                     f"bench {task.name}")
    if done is None:
        return None
    rows, timings, per_seed = [], [], {}
    for setting in settings:
        for method in methods:
            for budget in budgets:
                runs = [done[(setting, method, budget, seed)] for seed in seeds]
                metrics, raw = {}, {}
                for k in runs[0]["metrics"]:
                    vals = [r["metrics"][k] for r in runs]
                    metrics[k], metrics[f"{k}_ci95"] = mean_ci95(vals)
                    raw[k] = vals
                per_seed[(setting, method, budget)] = raw
                rows.append({"method": method, "setting": setting, "budget": budget,
                             "detail": task.detail(method, setting, budget), "metrics": metrics, "per_seed": raw})
                timings.append({"method": method, "setting": setting, "budget": budget,
                                "seconds_per_run": float(np.mean([r["seconds"] for r in runs])),
                                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)})
    comparisons = []
    key = task.primary_metric
    if task.baseline in methods:
        for setting in settings:
            for method in methods:
                if method == task.baseline:
                    continue
                for budget in budgets:
                    c = paired_comparison(per_seed[(setting, method, budget)][key],
                                          per_seed[(setting, task.baseline, budget)][key])
                    better = c["diff"] > 0 if task.higher_is_better else c["diff"] < 0
                    c["verdict"] = ("better" if better else "worse") if c["significant"] else "not significant"
                    comparisons.append({"method": method, "baseline": task.baseline, "setting": setting,
                                        "budget": budget, "metric": key, **c})
    results = {
        "task": task.name,
        "command": command or " ".join(["mmtts", *sys.argv[1:]]),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "processes": launched_world_size(),
        "versions": versions(),
        "seeds": seeds,
        "settings": settings,
        "budgets": budgets,
        "budget_unit": task.budget_unit,
        "primary_metric": key,
        "higher_is_better": task.higher_is_better,
        "task_config": task.describe(),
        "rows": rows,
        "comparisons": comparisons,
        "references": task.references(budgets) if task.budget_unit is not None else {},
        "timings": timings,
    }
    results["summary"] = task.summarize(results)
    if out is not None:
        write_results(results, Path(out))
        task.extra_plots(results, Path(out))
    return results


def markdown(results: dict) -> str:
    key = results["primary_metric"]
    metric_names = [k for k in results["rows"][0]["metrics"] if not k.endswith("_ci95")]
    lines = [f"# {results['task']}", "", f"Command: `{results['command']}`  ", f"Created: {results['created']}  ",
             f"Seeds: {results['seeds']}; settings: {results['settings']}; "
             f"budgets in {results['budget_unit']}: {results['budgets']}  ",
             f"Machine: {results['machine'].get('platform')}, {results['machine'].get('cpu_count')} CPUs, "
             f"CUDA: {results['machine'].get('cuda')}  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v), "",
             "Mean over seeds, with the half-width of the 95% t-interval (n/a from a single seed).", "",
             "| setting | method | budget | detail | " + " | ".join(metric_names) + " |",
             "|---|---|---:|---|" + "---:|" * len(metric_names)]
    for r in results["rows"]:
        cells = [f"{r['metrics'][m]:.4g} ± {interval(r['metrics'][m + '_ci95'])}" for m in metric_names]
        budget = "-" if r["budget"] is None else r["budget"]
        lines.append(f"| {r['setting']} | {r['method']} | {budget} | {r['detail']} | " + " | ".join(cells) + " |")
    if results["comparisons"]:
        lines += ["", f"Paired difference in {key} against the baseline at equal budget "
                      "(significant when the 95% interval excludes 0):", "",
                  "| setting | method | baseline | budget | difference | p | verdict |",
                  "|---|---|---|---:|---:|---:|---|"]
        for c in results["comparisons"]:
            budget = "-" if c["budget"] is None else c["budget"]
            p = "n/a" if c["p_value"] is None or not np.isfinite(c["p_value"]) else f"{c['p_value']:.3g}"
            lines.append(f"| {c['setting']} | {c['method']} | {c['baseline']} | {budget} | {c['diff']:+.4g} ± "
                         f"{interval(c['diff_ci95'])} | {p} | {c['verdict']} |")
    if results["references"]:
        lines += ["", "Reference values of " + key + ":", ""]
        for name, vals in results["references"].items():
            lines.append(f"- {name}: " + ", ".join(f"{b}: {v:.4g}" for b, v in zip(results["budgets"], vals)))
    if results.get("summary"):
        lines += ["", "Summary:", ""]
        for name, val in results["summary"].items():
            lines.append(f"- {name}: {val:.4g}" if isinstance(val, float) else f"- {name}: {val}")
    lines += ["", "Time per run (s): " + ", ".join(
        f"{t['setting']}/{t['method']}@{t['budget']}: {t['seconds_per_run']:.3g}" for t in results["timings"])]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Metric against budget with 95% bands (budget sweeps), or bars with 95% intervals per setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric_names = [k for k in results["rows"][0]["metrics"]
                    if not k.endswith("_ci95") and k not in ("nfe", "verifier_calls")
                    and any(isinstance(r["metrics"][k], (int, float)) and np.isfinite(r["metrics"][k])
                            for r in results["rows"])]  # a metric no row has a value of gets no panel
    settings = results["settings"]
    sweep = results["budget_unit"] is not None
    nrows = len(settings) if sweep else 1
    fig, axes = plt.subplots(nrows, len(metric_names), figsize=(5.2 * len(metric_names), 4 * nrows), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in results["rows"]))
    for i, setting in enumerate(settings if sweep else [None]):
        for ax, m in zip(axes[i], metric_names):
            if sweep:
                for method in methods:
                    rs = [r for r in results["rows"] if r["method"] == method and r["setting"] == setting]
                    x = np.array([r["budget"] for r in rs])
                    y = np.array([r["metrics"][m] for r in rs])
                    e = np.array([r["metrics"][m + "_ci95"] for r in rs])
                    ax.plot(x, y, marker="o", label=method)
                    ax.fill_between(x, y - e, y + e, alpha=0.2)
                if m == results["primary_metric"]:
                    for name, vals in results["references"].items():
                        ax.plot(results["budgets"], vals, linestyle="--",
                                color="gray" if "sup" in name else "black", label=name)
                ax.set_xscale("log", base=2)
                ax.set_xlabel(f"budget ({results['budget_unit']})")
                ax.set_title(setting if len(settings) > 1 else "")
            else:
                width = 0.8 / len(methods)
                for j, method in enumerate(methods):
                    rs = {r["setting"]: r for r in results["rows"] if r["method"] == method}
                    y = [rs[s_]["metrics"][m] for s_ in settings]
                    e = [rs[s_]["metrics"][m + "_ci95"] for s_ in settings]
                    ax.bar(np.arange(len(settings)) + j * width, y, width, yerr=e, capsize=3, label=method)
                ax.set_xticks(np.arange(len(settings)) + 0.4 - width / 2, settings, rotation=20, fontsize=8)
            ax.set_ylabel(m)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"{results['task']}: mean and 95% CI over seeds {results['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(results: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{results['task']}.json", "md": out / f"{results['task']}.md",
             "png": out / f"{results['task']}.png"}
    paths["json"].write_text(json.dumps(strict_json(results), indent=2, allow_nan=False) + "\n")
    paths["md"].write_text(markdown(results))
    plot(results, paths["png"])
    return paths
