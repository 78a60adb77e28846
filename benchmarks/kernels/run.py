"""Time the mmtts kernels against torch eager and torch.compile of the same expressions.

On a CUDA device every op runs three ways (the mmtts op, which dispatches
to its Triton kernel; the same math as plain torch eager; and that torch
function under torch.compile) over a range of sizes and dtypes. Each row
reports the median time, achieved memory bandwidth (the bytes the op must
move at least, over the time), its fraction of the device's peak, and the
speed-up over eager; the goals of the kernels are checked at the end.

``--dry-run`` runs the same cases on the CPU at small sizes, with the mmtts
ops forced onto their torch references and torch.compile left out, so the
script is exercised by the test suite without a GPU.

Results go to ``<out>/kernels.json`` and ``kernels.md`` (``kernels-dry-run.*``
for a dry run), in the shape of mmtts' benchmark results.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from mmtts.bench import machine_info, mean_ci95, versions

# Nominal HBM/GDDR bandwidth in GB/s; the driver's clock times bus width is the fallback.
KNOWN_PEAK_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0,
                   "H100 NVL": 3900.0, "A100-SXM4-80GB": 2039.0, "A100-SXM4-40GB": 1555.0,
                   "A100 80GB PCIe": 1935.0, "A100-PCIE-40GB": 1555.0, "L40S": 864.0, "L4": 300.0,
                   "RTX 4090": 1008.0, "A10G": 600.0}

GOALS = {"denoise_step": {"peak_fraction": 0.8, "speedup_vs_eager": 2.0}, "alpha_bn": {"speedup_vs_eager": 1.5}}
GOAL_MIN_ELEMENTS = 1 << 24  # goals are judged on large inputs, where launch overhead does not dominate


def peak_bandwidth(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-gbps"
    if device.type != "cuda":
        return None, "not measured on CPU"
    props = torch.cuda.get_device_properties(device)
    for name, gbps in KNOWN_PEAK_GBPS.items():
        if name in props.name:
            return gbps, f"nominal for {name}"
    return 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8 / 1e9, "driver clock x bus width"


def measure(fn, device: torch.device, repeats: int) -> list[float]:
    """Milliseconds per call: triton's do_bench (L2 flushed between calls) on CUDA, wall clock on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return list(do_bench(fn, warmup=25, rep=max(100, 10 * repeats), return_mode="all"))
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


# ---------------------------------------------------------------- the torch expressions the kernels replace

def denoise_eager(x, out, z, a, b, c, x0_a, x0_b):
    x_next = a * x + b * out + c * z
    return x_next, x0_a * x + x0_b * out


def denoise_drawn_eager(x, out, a, b, c, x0_a, x0_b):
    return denoise_eager(x, out, torch.randn_like(x), a, b, c, x0_a, x0_b)


def stats_eager(x):
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x.float(), dim=dims, unbiased=False)
    return mean, var


def alpha_bn_eager(x, src_mean, src_var, weight, bias, alpha: float, eps: float = 1e-5):
    """The two-pass alpha-BN as adapters write it: batch statistics, exact mixture, then normalize."""
    mean, var = stats_eager(x)
    m = alpha * src_mean + (1 - alpha) * mean
    v = alpha * src_var + (1 - alpha) * var + alpha * (1 - alpha) * (src_mean - mean) ** 2
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return ((x - m.reshape(shape)) / torch.sqrt(v.reshape(shape) + eps) * weight.reshape(shape)
            + bias.reshape(shape)).to(x.dtype)


def normalize_eager(x, mean, var, weight, bias, eps: float = 1e-5):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return ((x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps) * weight.reshape(shape)
            + bias.reshape(shape)).to(x.dtype)


def bn_train_eager(x, weight, bias, dy):
    y = torch.nn.functional.batch_norm(x, None, None, weight, bias, training=True)
    return torch.autograd.grad(y, (x, weight, bias), dy)


# ---------------------------------------------------------------- cases

def _rand(shape, dtype, device, g):
    return torch.randn(shape, generator=g, device="cpu").to(device=device, dtype=dtype)


def denoise_cases(shapes, dtypes, device):
    import mmtts.kernels as K

    for shape in shapes:
        for dtype in dtypes:
            g = torch.Generator().manual_seed(0)
            x, out, z = (_rand(shape, dtype, device, g) for _ in range(3))
            batch = shape[0]
            coefs = K.ddim_coefficients(torch.linspace(0.1, 0.9, batch), torch.linspace(0.2, 0.95, batch), eta=0.5)
            coefs = coefs.to(device)
            # no clip: the affine step, with the float32 coefficients the kernel reads
            col = [t.to(torch.float32).reshape((-1,) + (1,) * (len(shape) - 1)) for t in coefs[:5]]
            seeds = torch.arange(batch, dtype=torch.int64, device=device) + 1
            offsets = torch.zeros(batch, dtype=torch.int64, device=device)
            size = x.numel() * x.element_size()
            yield {"op": "denoise_step", "variant": "given z", "shape": shape, "dtype": dtype, "bytes": 5 * size,
                   "mmtts": partial(K.denoise_step, x, out, coefs, z=z),
                   "torch": denoise_eager, "args": (x, out, z, *col)}
            yield {"op": "denoise_step", "variant": "drawn z", "shape": shape, "dtype": dtype, "bytes": 4 * size,
                   "mmtts": partial(K.denoise_step, x, out, coefs, seed=seeds, offset=offsets),
                   "torch": denoise_drawn_eager, "args": (x, out, *col), "compare": 1}  # x0 only: noise differs


def norm_cases(shapes, dtypes, device):
    import mmtts.kernels as K

    for shape in shapes:
        for dtype in dtypes:
            g = torch.Generator().manual_seed(0)
            c = shape[1]
            x = (_rand(shape, dtype, device, g) * 2 + 1).to(dtype)
            w, b, src_mean = (_rand((c,), torch.float32, device, g) for _ in range(3))
            src_var = _rand((c,), torch.float32, device, g).abs() + 0.5
            size = x.numel() * x.element_size()
            base = {"shape": shape, "dtype": dtype}
            yield {**base, "op": "batch_norm_stats", "variant": "", "bytes": size,
                   "mmtts": partial(K.batch_norm_stats, x), "torch": stats_eager, "args": (x,)}
            yield {**base, "op": "alpha_bn", "variant": "forward, alpha 0.3", "bytes": 3 * size,
                   "mmtts": partial(K.batch_norm, x, src_mean, src_var, w, b, training=True, source_weight=0.3,
                                    exact_mixture=True),
                   "torch": alpha_bn_eager, "args": (x, src_mean, src_var, w, b, 0.3)}
            yield {**base, "op": "normalize_affine", "variant": "", "bytes": 2 * size,
                   "mmtts": partial(K.normalize_affine, x, src_mean, src_var, w, b),
                   "torch": normalize_eager, "args": (x, src_mean, src_var, w, b)}
            xg, wg, bg = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
            dy = _rand(shape, dtype, device, g)

            def train_step(xg=xg, wg=wg, bg=bg, dy=dy):
                return torch.autograd.grad(K.batch_norm(xg, None, None, wg, bg), (xg, wg, bg), dy)

            yield {**base, "op": "batch_norm_train", "variant": "forward + backward", "bytes": 8 * size,
                   "mmtts": train_step, "torch": bn_train_eager, "args": (xg, wg, bg, dy)}


def _first_tensors(result):
    items = result if isinstance(result, (tuple, list)) else (result,)
    return [t for t in items if torch.is_tensor(t)]


AGREEMENT = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}


def relative_error(ours, theirs, compare: int | None) -> float:
    """Largest difference over the outputs, relative to the output's scale (at least 1)."""
    a, b = _first_tensors(ours), _first_tensors(theirs)
    if compare is not None:
        a, b = a[compare:compare + 1], b[compare:compare + 1]
    return max(float((x.float() - y.float()).abs().max()) / max(1.0, float(y.float().abs().max()))
               for x, y in zip(a, b))


def run_case(case, device, repeats, peak, use_compile):
    ours = case["mmtts"]()
    eager_fn = lambda: case["torch"](*case["args"])  # noqa: E731
    err = relative_error(ours, eager_fn(), case.get("compare"))
    methods = {"mmtts": case["mmtts"], "torch_eager": eager_fn}
    errors = {}
    if use_compile:
        compiled = torch.compile(case["torch"], dynamic=False)
        try:
            compiled(*case["args"])
            methods["torch_compile"] = lambda: compiled(*case["args"])
        except Exception as exc:  # a broken compiler toolchain must not sink the other measurements
            errors["torch_compile"] = f"{type(exc).__name__}: {exc}"[:300]
    times = {name: measure(fn, device, repeats) for name, fn in methods.items()}
    eager_ms = statistics.median(times["torch_eager"])
    numel = 1
    for s in case["shape"]:
        numel *= s
    setting = f"{case['op']} {case['variant']} {'x'.join(map(str, case['shape']))} {str(case['dtype'])[6:]}"
    rows = []
    for name, ts in times.items():
        ms = statistics.median(ts)
        _, ci = mean_ci95(ts)
        gbps = case["bytes"] / (ms * 1e-3) / 1e9
        rows.append({"method": name, "setting": setting.replace("  ", " "), "budget": None,
                     "detail": {"op": case["op"], "variant": case["variant"], "shape": list(case["shape"]),
                                "dtype": str(case["dtype"]), "elements": numel, "bytes": case["bytes"],
                                "rel_diff_vs_eager": err, "agrees": err <= AGREEMENT[case["dtype"]]},
                     "metrics": {"ms": ms, "ms_ci95": ci, "gbps": gbps,
                                 "peak_fraction": None if peak is None else gbps / peak,
                                 "speedup_vs_eager": eager_ms / ms}})
    for name, msg in errors.items():
        rows.append({"method": name, "setting": setting, "budget": None, "detail": {"error": msg}, "metrics": {}})
    return rows


def check_goals(rows):
    out = []
    for row in rows:
        goal = GOALS.get(row["detail"].get("op"))
        if row["method"] != "mmtts" or goal is None or row["detail"]["elements"] < GOAL_MIN_ELEMENTS:
            continue
        for metric, target in goal.items():
            value = row["metrics"].get(metric)
            out.append({"setting": row["setting"], "metric": metric, "target": target, "value": value,
                        "met": value is not None and value >= target})
    return out


def markdown(results) -> str:
    lines = [f"# {results['task']}", "", f"Command: `{results['command']}`  ", f"Created: {results['created']}  ",
             f"Device: {results['machine'].get('cuda') or 'CPU'}; peak bandwidth: "
             + (f"{results['peak_gbps']:.0f} GB/s ({results['peak_source']})  " if results["peak_gbps"]
                else f"{results['peak_source']}  "),
             "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v), "",
             "Median time per call (95% interval of the mean in brackets), achieved bandwidth, and speed-up "
             "over torch eager of the same expression.", "",
             "| setting | method | ms | GB/s | of peak | vs eager | agrees |", "|---|---|---:|---:|---:|---:|---|"]
    for r in results["rows"]:
        m = r["metrics"]
        if not m:
            lines.append(f"| {r['setting']} | {r['method']} | failed: {r['detail']['error']} | | | | |")
            continue
        peak = "-" if m["peak_fraction"] is None else f"{m['peak_fraction']:.0%}"
        lines.append(f"| {r['setting']} | {r['method']} | {m['ms']:.4g} (±{m['ms_ci95']:.2g}) | {m['gbps']:.4g} | "
                     f"{peak} | {m['speedup_vs_eager']:.2f}x | {'yes' if r['detail']['agrees'] else 'NO'} |")
    if results["goals"]:
        lines += ["", "Goals (inputs of at least 2**24 elements):", "", "| setting | metric | target | value | met |",
                  "|---|---|---:|---:|---|"]
        for g in results["goals"]:
            value = "-" if g["value"] is None else f"{g['value']:.3g}"
            met = "yes" if g["met"] else "NO"
            lines.append(f"| {g['setting']} | {g['metric']} | {g['target']} | {value} | {met} |")
    return "\n".join(lines) + "\n"


SIZES = {
    "gpu": {"denoise": [(8, 4, 64, 64), (16, 4, 128, 128), (64, 16, 128, 128), (8, 3, 1024, 1024)],
            "norm": [(64, 2048, 7, 7), (64, 256, 28, 28), (64, 64, 56, 56), (128, 64, 112, 112)],
            "dtypes": [torch.float32, torch.bfloat16]},
    "dry-run": {"denoise": [(1, 1023), (3, 4, 5, 7)], "norm": [(2, 3, 5, 7), (3, 4, 1, 1500)],
                "dtypes": [torch.float32, torch.float16]},
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, small sizes, torch references, no compile")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per method (CPU) / scale of do_bench")
    parser.add_argument("--peak-gbps", type=float, default=None, help="device peak bandwidth, if the table lacks it")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile column")
    parser.add_argument("--only", choices=["denoise", "norm"], default=None, help="run one family of ops")
    args = parser.parse_args(argv)

    if args.dry_run:
        os.environ["MMTTS_KERNELS"] = "torch"
        device, sizes, repeats = torch.device("cpu"), SIZES["dry-run"], args.repeats or 3
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device; run with --dry-run to check the script on the CPU")
        os.environ.setdefault("MMTTS_KERNELS", "auto")
        device, sizes, repeats = torch.device("cuda"), SIZES["gpu"], args.repeats or 10
    peak, peak_source = peak_bandwidth(device, args.peak_gbps)
    use_compile = not (args.dry_run or args.no_compile)
    if use_compile:  # one compiled graph per shape and dtype: keep dynamo from falling back to eager after 8
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)

    cases = []
    if args.only in (None, "denoise"):
        cases += list(denoise_cases(sizes["denoise"], sizes["dtypes"], device))
    if args.only in (None, "norm"):
        cases += list(norm_cases(sizes["norm"], sizes["dtypes"], device))
    rows = []
    for i, case in enumerate(cases):
        rows += run_case(case, device, repeats, peak, use_compile)
        print(f"[{i + 1}/{len(cases)}] {rows[-1]['setting']}", file=sys.stderr, flush=True)
    task = "kernels-dry-run" if args.dry_run else "kernels"
    results = {
        "task": task,
        "command": " ".join(["python", "benchmarks/kernels/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "seeds": [0],
        "dry_run": args.dry_run,
        "backend": "torch reference (dry run)" if args.dry_run else "triton on CUDA",
        "peak_gbps": peak,
        "peak_source": peak_source,
        "rows": rows,
        "goals": check_goals(rows),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{task}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{task}.md").write_text(markdown(results))
    print(f"wrote {out / (task + '.json')} and {task}.md", file=sys.stderr)
    wrong = sorted({r["setting"] for r in rows if r["method"] == "mmtts" and not r["detail"]["agrees"]})
    if wrong:
        raise SystemExit("mmtts disagrees with torch eager on: " + "; ".join(wrong))
    return results


if __name__ == "__main__":
    main()
