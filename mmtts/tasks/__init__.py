"""Offline benchmark tasks: data, reference models cached locally, metrics."""

from . import gui_grounding, image_search, toy_gmm, vla_mujoco  # noqa: F401  (registration)
from . import tta_corruptions, tta_pretrained  # noqa: F401  (registration)
from .base import Task
from .cache import ModelCache

__all__ = ["ModelCache", "Task"]
