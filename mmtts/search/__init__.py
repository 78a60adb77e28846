"""Search strategies, written once against the core interface and registered by name."""

from . import beam, best_of_n, particle_filter, region_vote  # noqa: F401  (registration)
