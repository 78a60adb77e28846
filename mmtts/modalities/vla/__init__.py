"""Vision-language-action policies: sample N actions, perturb to K, vote, verify (RoboMonkey).

    space = ActionSpace.from_gym(env.action_space)
    policy = RoboMonkeyPolicy(GaussianPolicy(net, state_dim), ActionVerifier(scorer), space,
                              num_samples=8, num_candidates=16)
    action = policy.select_action({"observation.state": obs})   # (B, action_dim)
    policy.reset()                                               # between episodes
"""

from .augment import Candidates, GaussianAugmenter, SampleSet
from .policy import GaussianPolicy, NoisePolicy, SamplingPolicy
from .proposer import NoValidActionError, Proposer
from .select import Selector
from .space import ActionSpace
from .train import bradley_terry_margin_loss, synthetic_pairs, train_action_verifier
from .verifier import ActionVerifier, MLPActionScorer, QuadraticFeatures
from .wrapper import DeadlineMissed, RoboMonkeyPolicy, StepDiagnostics

__all__ = ["ActionSpace", "ActionVerifier", "Candidates", "DeadlineMissed", "GaussianAugmenter", "GaussianPolicy",
           "MLPActionScorer", "NoValidActionError", "NoisePolicy", "Proposer", "QuadraticFeatures", "RoboMonkeyPolicy",
           "SampleSet", "SamplingPolicy", "Selector", "StepDiagnostics", "bradley_terry_margin_loss", "synthetic_pairs",
           "train_action_verifier"]
