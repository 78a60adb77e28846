"""Verifiers for real models: classifiers, CLIP, and the core's ensembles and cache (imported on first use)."""

from ..core.lazy import lazy_submodules
from ..core.verifier import Cached, MeanRank

__all__ = ["CLIPScore", "Cached", "ClassifierLogProb", "MeanRank"]
__getattr__, __dir__ = lazy_submodules(__name__, __file__, {"ClassifierLogProb": "classifier", "CLIPScore": "clip"})
