"""Running a wrapped policy in a gymnasium environment.

Gymnasium hands out numpy observations, one per environment (or a batch from
a vector env), and takes numpy actions; LeRobot-style policies take dict
batches of tensors. ``GymPolicy`` converts both ways and owns the episode
boundary, so ``reset()`` happens exactly when the environment resets.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ...core.errors import MmttsError
from .policy import STATE_KEY


class GymPolicy:
    """Act in a gymnasium loop with any LeRobot-shaped policy: ``action = agent(obs)``.

    ``obs`` is one flat observation (S,) or a vector env's batch (E, S); the
    action comes back with the matching shape as float32 numpy.

    Args:
        policy: a LeRobot-style policy with ``select_action(batch)`` and ``reset()``.
        state_key: the batch key under which the observation is passed.
        instruction: optional text passed to the policy as the batch's ``"task"``.
    """

    def __init__(self, policy, state_key: str = STATE_KEY, instruction: str | None = None):
        if not (hasattr(policy, "select_action") and hasattr(policy, "reset")):
            raise MmttsError(f"{type(policy).__name__} is not a LeRobot-style policy: it needs select_action(batch) "
                             "and reset()")
        self.policy, self.state_key, self.instruction = policy, state_key, instruction

    def reset(self) -> None:
        self.policy.reset()

    def __call__(self, obs) -> np.ndarray:
        x = torch.as_tensor(np.asarray(obs), dtype=torch.float32)
        single = x.ndim == 1
        if single:
            x = x[None]
        if x.ndim != 2:
            raise MmttsError(f"expected a flat observation (S,) or a vector env batch (E, S); got shape "
                             f"{tuple(x.shape)} (flatten dict or image observations into a batch yourself)")
        batch = {self.state_key: x}
        if self.instruction is not None:
            batch["task"] = [self.instruction] * x.shape[0]
        action = self.policy.select_action(batch)
        out = action.detach().cpu().numpy().astype(np.float32)
        if not np.isfinite(out).all():
            raise MmttsError("the policy produced a NaN/inf action; refusing to send it to the environment")
        return out[0] if single else out


def run_episode(env, agent: GymPolicy, seed: int | None = None, on_step: Callable | None = None) -> dict:
    """One episode: ``env.reset(seed)``, ``agent.reset()``, then act until terminated or truncated.

    ``on_step(obs, action, next_obs, info)`` sees every transition. Returns
    the summed reward, the number of steps and the last observation.
    """
    obs, _ = env.reset(seed=seed)
    agent.reset()
    total, steps, done = 0.0, 0, False
    while not done:
        action = agent(obs)
        nxt, reward, terminated, truncated, info = env.step(action)
        if on_step is not None:
            on_step(obs, action, nxt, info)
        total += float(reward)
        steps += 1
        obs, done = nxt, bool(terminated or truncated)
    return {"return": total, "steps": steps, "final_obs": obs}
