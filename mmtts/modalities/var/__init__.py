"""Visual autoregressive (VAR) models: a multi-scale VQ tokenizer, a next-scale transformer, and their Process."""

from .process import VARProcess, sample_tokens
from .tokenizer import MultiScaleVQ
from .transformer import NextScaleTransformer

__all__ = ["MultiScaleVQ", "NextScaleTransformer", "VARProcess", "sample_tokens"]
