"""Search strategies, written once against the core interface and registered by name.

Each strategy lives in its own module, imported on first use of its name
(``mmtts.search(..., "evosearch")``) or of the module itself
(``mmtts.strategies.region_vote``); ``mmtts.list_strategies()`` lists them all.
"""

from ..core.lazy import lazy_submodules

__getattr__, __dir__ = lazy_submodules(__name__, __file__)
