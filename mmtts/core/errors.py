"""Errors raised for user mistakes. The CLI prints these as one line, without a traceback."""

from typing import Any, Callable


class MmttsError(Exception):
    """A problem with what the user asked for; the message names it and the fix."""


class BudgetError(MmttsError, ValueError):
    """A budget that is invalid or too small for the requested work."""


class BudgetExceeded(MmttsError, RuntimeError):
    """A strategy asked for work past its budget cap (a strategy bug: they size schedules from the cap)."""


class VerifierError(MmttsError, ValueError):
    """A verifier returned something that cannot be used as one score per candidate."""


class UnknownNameError(MmttsError, KeyError):
    """A strategy, adapter, task or verifier name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingWeightsError(MmttsError, FileNotFoundError):
    """A model file that is not on disk; nothing is fetched from the network."""


class SettingsError(MmttsError, ValueError):
    """A strategy setting that is misspelt, of the wrong type, or out of its range."""


class ProcessError(MmttsError, RuntimeError):
    """A process broke its contract (a batch of the wrong size, say); the message names the process."""


class CollapseWarning(UserWarning):
    """A population search ended with copies of one candidate where it needed distinct ones."""


def call_user(fn: Callable, *args: Any, explain: Callable[[Exception], str], error: type = None) -> Any:
    """``fn(*args)`` for a function the user gave (a policy, a scoring function): an exception it raises becomes
    ``error(explain(e))`` (an :class:`MmttsError` by default), chained to the original. An MmttsError passes
    through unchanged, and so does running out of memory."""
    try:
        return fn(*args)
    except MmttsError:
        raise
    except MemoryError:
        raise
    except Exception as e:
        if type(e).__name__ == "OutOfMemoryError":  # torch's, without importing torch here
            raise
        raise (error or MmttsError)(explain(e)) from e
