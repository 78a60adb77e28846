"""Offline benchmark tasks: data, reference models cached locally, metrics."""
