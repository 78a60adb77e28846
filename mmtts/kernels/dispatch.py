"""Choose, per call, between a Triton kernel and its pure-torch reference.

The choice is made from the tensors of each call, never at import: CUDA
tensors go to Triton, everything else to the reference, so importing mmtts
never touches a GPU driver and the same code runs on a laptop and on a GPU
node. ``MMTTS_KERNELS`` overrides the choice for every call:

- ``auto`` (default): Triton for CUDA tensors when Triton is importable;
- ``torch``: always the reference (to rule a kernel out when debugging);
- ``triton``: always the kernel. On CPU tensors this only works under Triton's
  interpreter (``TRITON_INTERPRET=1`` set before triton is first imported),
  which is how the kernels are tested on machines without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

ENV_VAR = "MMTTS_KERNELS"
_CHOICES = ("auto", "torch", "triton")


def requested_backend() -> str:
    """The value of ``MMTTS_KERNELS``, checked; ``auto`` when unset."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(_CHOICES)}; unset it or pick one of these")
    return value


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (read from the environment, as Triton does)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when this call should run the Triton kernel on ``tensors``."""
    backend = requested_backend()
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise RuntimeError(f"{ENV_VAR}=triton but triton is not installed; install triton or set {ENV_VAR}=auto")
    if not on_cuda and not interpreting():
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"{ENV_VAR}=triton with tensors on {devices}: Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 "
            "set before triton is imported to run them on the CPU; otherwise set " f"{ENV_VAR}=auto")
    return True
