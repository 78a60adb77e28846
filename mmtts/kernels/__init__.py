"""Triton kernels, their pure-torch references, and the dispatch between them."""
