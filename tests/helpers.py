"""Small processes and verifiers shared by the core tests."""

from mmtts.core import Process, State, Verifier


class CountingProcess(Process):
    """x accumulates one noise draw per stage; ``nfe_per_stage`` lets tests model guidance cost."""

    def __init__(self, num_stages=4, dim=3, nfe_per_stage=1):
        self.num_stages = num_stages
        self.dim = dim
        self.nfe_per_stage = nfe_per_stage

    def init(self, streams, first_index=0):
        return State.fresh({"x": streams.randn((self.dim,))}, streams, first_index)

    def step(self, state):
        out = state.replace(x=state.data["x"] + state.streams.randn((self.dim,)))
        out.stage = state.stage + 1
        return out

    def preview(self, state):
        return state.data["x"].clone()

    def finish(self, state):
        return state.data["x"].clone()


class SumVerifier(Verifier):
    name = "sum"

    def score(self, outputs, context=None):
        return outputs.sum(1)


class Stop(Exception):
    """Raised by :func:`stop_after` to interrupt a search at a checkpoint."""


def stop_after(k):
    """An ``on_checkpoint`` hook that interrupts the search once ``k`` checkpoints are written."""
    def hook(count):
        if count == k:
            raise Stop
    return hook
