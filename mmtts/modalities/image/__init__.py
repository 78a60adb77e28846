"""Image diffusion: diffusers models as searchable Processes."""

from .process import ImageProcess, denoiser_call
from .schedulers import Schedule, schedule_from_scheduler

__all__ = ["ImageProcess", "Schedule", "denoiser_call", "schedule_from_scheduler"]
