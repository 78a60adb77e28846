"""Verifiers for real models: classifiers, CLIP, and the core's ensembles and cache."""

from ..core.verifier import Cached, MeanRank
from .classifier import ClassifierLogProb
from .clip import CLIPScore

__all__ = ["CLIPScore", "Cached", "ClassifierLogProb", "MeanRank"]
