"""Triton kernels, their pure-torch references, and the dispatch between them.

Two hot paths get fused kernels:

- the denoising step of a population of candidates (:func:`denoise_step`,
  with coefficients from :mod:`mmtts.kernels.schedules` and per-candidate
  in-kernel Philox noise, :func:`candidate_noise`);
- online normalization for test-time adaptation (:func:`batch_norm_stats`,
  :func:`alpha_mix`, :func:`normalize_affine`, :class:`StreamingStats` and
  the differentiable :func:`batch_norm`).

Every op runs its Triton kernel on CUDA tensors and its reference elsewhere,
decided per call; ``MMTTS_KERNELS=torch|triton|auto`` overrides (see
:mod:`mmtts.kernels.dispatch`). Importing this package never imports triton.
"""

from .batchnorm import batch_norm, batch_norm_layer, normalize_affine
from .denoise import StepCoefficients, denoise_step, denoise_step_reference
from .philox import candidate_noise, philox_normal_reference, philox_uniform_reference
from .schedules import (alpha_sigma_coefficients, coefficients_from_scheduler, ddim_coefficients, ddpm_coefficients,
                        flow_match_coefficients, posterior_std)
from .stats import (BatchStats, StreamingStats, alpha_mix, batch_norm_stats, batch_norm_stats_reference,
                    merge_stats, update_running_stats)

__all__ = [
    "BatchStats", "StepCoefficients", "StreamingStats", "alpha_mix", "alpha_sigma_coefficients", "batch_norm",
    "batch_norm_layer", "batch_norm_stats", "batch_norm_stats_reference", "candidate_noise",
    "coefficients_from_scheduler", "ddim_coefficients",
    "ddpm_coefficients", "denoise_step", "denoise_step_reference", "flow_match_coefficients", "merge_stats",
    "normalize_affine", "philox_normal_reference", "philox_uniform_reference", "posterior_std", "update_running_stats",
]
