"""Vision-language-action policies: sample N actions, perturb to K, vote, verify (RoboMonkey).

    space = ActionSpace.from_gym(env.action_space)
    policy = RoboMonkeyPolicy(GaussianPolicy(net, state_dim), ActionVerifier(scorer), space,
                              n=16, policy_samples=8)
    action = policy.select_action({"observation.state": obs})   # (B, action_dim)
    policy.reset()                                               # between episodes

or one search over a batch of observations through the core:

    process = ActionProcess(GaussianPolicy(net, state_dim), {"observation.state": obs}, space)
    result = mmtts.search(process, ActionVerifier(scorer), "robomonkey", budget=8 * len(obs), n=16,
                          policy_samples=8)
"""

from .augment import Candidates, GaussianAugmenter, SampleSet
from .policy import GaussianPolicy, NoisePolicy, SamplingPolicy
from .process import ActionProcess, NoValidActionError
from .select import Selector
from .space import ActionSpace
from .train import bradley_terry_margin_loss, synthetic_pairs, train_action_verifier
from .verifier import ActionVerifier, FoldedActionScorer, MLPActionScorer, QuadraticFeatures
from .wrapper import DeadlineMissed, RoboMonkeyPolicy, StepDiagnostics

__all__ = ["ActionProcess", "ActionSpace", "ActionVerifier", "Candidates", "DeadlineMissed", "FoldedActionScorer",
           "GaussianAugmenter", "GaussianPolicy", "MLPActionScorer", "NoValidActionError", "NoisePolicy",
           "QuadraticFeatures", "RoboMonkeyPolicy", "SampleSet", "SamplingPolicy", "Selector", "StepDiagnostics",
           "bradley_terry_margin_loss", "synthetic_pairs", "train_action_verifier"]
