"""Scale-out over processes and machines with accelerate: benchmark cells and one search's candidates.

See docs/scale-out.md. Nothing here is imported by ``import mmtts``.
"""

from .comm import Comm, RankFailed, split_sizes
from .search import ShardedProcess, ShardedVerifier, run_on_rank_zero

__all__ = ["Comm", "RankFailed", "ShardedProcess", "ShardedVerifier", "run_on_rank_zero", "split_sizes"]
