"""Search strategies, written once against the core interface and registered by name."""

from . import beam, best_of_n, evosearch, particle_filter, paths, region_vote, zero_order  # noqa: F401  (registration)
