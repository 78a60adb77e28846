"""The shared vocabulary: Process, State, Verifier, Strategy, Budget, Adapter, Result."""

from .adapter import Adapter
from .budget import Budget
from .errors import BudgetError, BudgetExceeded, MissingWeightsError, MmttsError, UnknownNameError, VerifierError
from .process import Process
from .result import Result
from .rng import Streams
from .state import State
from .strategy import SearchContext, Selection, Strategy
from .verifier import Cached, FunctionVerifier, MeanRank, Verifier

__all__ = ["Adapter", "Budget", "BudgetError", "BudgetExceeded", "Cached", "FunctionVerifier", "MeanRank",
           "MissingWeightsError", "MmttsError", "Process", "Result", "SearchContext", "Selection", "State",
           "Strategy", "Streams", "UnknownNameError", "Verifier", "VerifierError"]
