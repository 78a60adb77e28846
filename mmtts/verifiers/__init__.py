"""Verifiers for real models: classifiers, CLIP, ensembles, learned verifiers."""
