"""Verifiers for real models: classifiers, CLIP, clips of video, and the core's ensembles and cache (imported on first use)."""

from ..core.lazy import lazy_submodules
from ..core.verifier import Cached, MeanRank

__all__ = ["CLIPScore", "Cached", "ChecklistJudge", "ClassifierLogProb", "FrameVerifier", "MeanRank", "PerDepth",
           "TemporalConsistency"]
__getattr__, __dir__ = lazy_submodules(__name__, __file__, {
    "ClassifierLogProb": "classifier", "CLIPScore": "clip", "FrameVerifier": "video", "TemporalConsistency": "video",
    "PerDepth": "video", "ChecklistJudge": "video"})
