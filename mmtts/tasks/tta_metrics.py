"""Measurements shared by the test-time adaptation benchmarks: calibration, time and memory per batch."""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| weighted by bin size."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(total)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_reader():
    """Bytes in use by the C heap (glibc's mallinfo2), where torch's CPU allocator draws from; None elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).mallinfo2
    except (OSError, AttributeError, TypeError):
        return None
    fn.restype = _MallInfo2

    def read() -> int:
        info = fn()
        return info.uordblks + info.hblkhd
    return read


_HEAP = _heap_reader()


class _PeakHeap(TorchDispatchMode):
    """Samples heap use after every torch operator (forward and backward) and keeps the maximum."""

    def __init__(self):
        super().__init__()
        self.start = _HEAP()
        self.peak = self.start

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _HEAP())
        return out


def peak_step_memory_mb(step, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Run ``step(x)`` and return its output and the peak memory it allocated above the resting state (MB).

    On CUDA this is ``torch.cuda.max_memory_allocated``; on the CPU the C heap
    is sampled after every operator, which catches activations, gradients and
    optimizer state but not a transient inside a single operator. NaN when
    neither is available.
    """
    if x.is_cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = step(x)
        torch.cuda.synchronize()
        return out, (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    if _HEAP is None:
        return step(x), float("nan")
    with _PeakHeap() as probe:
        out = step(x)
    return out, max(probe.peak - probe.start, 0) / 2 ** 20


@dataclass
class StreamLog:
    """Predictions and costs collected while an adapter runs over a stream of batches.

    Attributes:
        logits: the logits of each batch.
        seconds: the time each batch took.
        peak_mb: peak memory in MB, NaN when not measured.
    """

    logits: list = field(default_factory=list)
    seconds: list = field(default_factory=list)
    peak_mb: float = float("nan")

    def run(self, adapter, x: torch.Tensor) -> torch.Tensor:
        """One call of the adapter: the first warms up, the second is measured for memory, the rest are timed."""
        if not self.logits:
            out = adapter(x)
        elif len(self.logits) == 1:
            out, self.peak_mb = peak_step_memory_mb(adapter, x)
        else:
            if x.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = adapter(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - t0)
        self.logits.append(out.detach().float().cpu())
        return out

    def summary(self, targets: torch.Tensor, adapter) -> dict[str, float]:
        logits = torch.cat(self.logits)
        probs = logits.softmax(1)
        conf, pred = probs.max(1)
        correct = (pred == targets).numpy()
        cost = getattr(adapter, "cost", None)
        return {
            "error": float(1.0 - correct.mean()),
            "ece": expected_calibration_error(conf.numpy(), correct),
            "ms_per_batch": 1000.0 * float(np.mean(self.seconds)) if self.seconds else float("nan"),
            "backward_per_sample": cost.per_sample("backward_samples") if cost else 0.0,
            "forward_per_sample": cost.per_sample("forward_samples") if cost else 1.0,
            "peak_mb": self.peak_mb,
        }


def paired_summary(results: dict, pairs: list[tuple[str, str]], metric: str) -> dict[str, str]:
    """Paired differences ``a - b`` in ``metric`` over seeds for each setting, with the 95% interval and a verdict.

    The benchmark table compares every method with the baseline only; the
    claims about adaptation are about neighbours (TENT against BN, EATA
    against TENT), so those differences are spelled out here. Also the time of
    each method per batch as a multiple of the plain forward (the baseline).
    """
    from ..bench import paired_comparison  # the runner imports the tasks; import it when used

    seeds = {(r["setting"], r["method"]): r["per_seed"] for r in results["rows"]}
    out = {}
    for setting in results["settings"]:
        for a, b in pairs:
            if (setting, a) not in seeds or (setting, b) not in seeds:
                continue
            c = paired_comparison(seeds[(setting, a)][metric], seeds[(setting, b)][metric])
            verdict = (("lower" if c["diff"] < 0 else "higher") if c["significant"] else "not significant")
            out[f"{setting}: {a} - {b} ({metric})"] = (f"{c['diff']:+.4f} ± {c['diff_ci95']:.4f}, "
                                                        f"p = {c['p_value']:.3g}, {verdict}")
        base = seeds.get((setting, results["rows"][0]["method"]))
        for (st, method), vals in seeds.items():
            if st == setting and base is not None and method != results["rows"][0]["method"]:
                ratio = np.mean(vals["ms_per_batch"]) / np.mean(base["ms_per_batch"])
                if np.isfinite(ratio):  # too few batches to time leaves NaN
                    out[f"{setting}: {method} time per batch / plain forward"] = f"{ratio:.2f}x"
    return out
