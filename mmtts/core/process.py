"""Process: a generative model run in stages over a batch of candidates.

A diffusion step, a video frame unit, a VAR scale, one draw of robot actions
or of click points are all stages. Strategies only ever see this interface,
so one search algorithm serves every modality.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from .rng import Streams
from .state import State


class Process(ABC):
    """Subclasses set ``num_stages`` and ``nfe_per_stage`` and implement init/step/finish.

    ``nfe_per_stage`` is the number of model forwards one stage costs one
    candidate: 2 for a classifier-free-guided step, the token count of a scale
    for a token budget. Override :meth:`stage_nfe` when stages differ.
    ``decodes_on_preview`` / ``decodes_on_finish`` say whether those calls run
    a decoder (a VAE), so the budget counts decodes.
    """

    num_stages: int = 1
    nfe_per_stage: int = 1
    #: the State.data entry holding each candidate's latent (noise at stage 0), for strategies that move it
    latent_key: str = "x"
    decodes_on_preview: bool = False
    decodes_on_finish: bool = False
    #: (width, height) of the integer grid that point or box outputs live on (a screenshot's pixels), read by
    #: region voting to build its vote grid; None for processes whose outputs are not positions on a grid
    extent: tuple[int, int] | None = None

    # -- costs ------------------------------------------------------------------
    def stage_nfe(self, stage: torch.Tensor) -> torch.Tensor:
        """NFE to advance candidates currently at ``stage`` by one stage (per candidate)."""
        return torch.full_like(stage, self.nfe_per_stage)

    def nfe_per_candidate(self) -> int:
        """NFE to take one fresh candidate through every stage."""
        stages = torch.arange(self.num_stages, dtype=torch.int64)
        return int(self.stage_nfe(stages).sum())

    # -- the process ---------------------------------------------------------------
    @abstractmethod
    def init(self, streams: Streams, first_index: int = 0) -> State:
        """Start ``len(streams)`` fresh candidates (draw initial noise from their own streams)."""

    @abstractmethod
    def step(self, state: State) -> State:
        """Advance every candidate by one stage; noise comes from each candidate's stream."""

    @abstractmethod
    def finish(self, state: State) -> Any:
        """The final outputs of completed candidates (a batch)."""

    def preview(self, state: State) -> Any:
        """A scoreable estimate of each partial candidate's final output (x0-hat, a partial video)."""
        if bool((state.stage >= self.num_stages).all()):
            return self.finish(state)
        raise NotImplementedError(f"{type(self).__name__} has no preview of partial candidates")

    def context(self, state: State) -> Any:
        """The conditioning a verifier needs for each candidate (labels, prompts); None by default."""
        return None

    def is_done(self, state: State) -> torch.Tensor:
        return state.stage >= self.num_stages

    def latent(self, state: State) -> torch.Tensor:
        """Each candidate's current latent (the initial noise at stage 0)."""
        if self.latent_key not in state.data:
            raise NotImplementedError(f"{type(self).__name__} exposes no latent {self.latent_key!r} to search over")
        return state.data[self.latent_key]

    def with_latent(self, state: State, latent: torch.Tensor) -> State:
        """The same candidates with their latents replaced (streams and lineage kept)."""
        if latent.shape != self.latent(state).shape:
            raise ValueError(f"latent of shape {tuple(latent.shape)} for candidates of shape "
                             f"{tuple(self.latent(state).shape)}")
        return state.replace(**{self.latent_key: latent})

    # -- stochasticity ----------------------------------------------------------------
    def is_stochastic(self, stage: int) -> bool | None:
        """Whether the step from ``stage`` draws fresh noise from each candidate's stream.

        True: two copies of a candidate at ``stage`` come out of the step
        different; False: the step is a deterministic function of the
        candidate (a DDIM step with eta = 0, or the last step of most
        samplers); None (the default): the process does not say. Strategies
        that copy candidates and rely on the copies diverging (beam,
        particle-filter) read it to avoid selecting into identical copies.
        """
        return None

    def forks_diverge(self, stage: int) -> bool | None:
        """Whether copies of a candidate at ``stage`` can still end differently without a perturbation.

        True when a later step is stochastic, False when every remaining step is
        declared deterministic (or none remains), None when undeclared.
        """
        known = [self.is_stochastic(t) for t in range(int(stage), self.num_stages)]
        if any(k is True for k in known):
            return True
        return False if all(k is False for k in known) else None

    # -- optional capabilities -------------------------------------------------------
    def perturb(self, state: State, scale: float | torch.Tensor) -> State:
        """Mutate candidates at their current stage with the stage's own noise scale."""
        raise NotImplementedError(f"{type(self).__name__} cannot perturb candidates")

    def renoise(self, state: State, stages: int) -> State:
        """Move candidates back ``stages`` stages by the forward noising transition."""
        raise NotImplementedError(f"{type(self).__name__} cannot re-noise candidates")

    def describe(self) -> dict:
        return {"process": type(self).__name__, "num_stages": self.num_stages,
                "nfe_per_candidate": self.nfe_per_candidate()}
