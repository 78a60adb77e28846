"""The wrapper in real gymnasium MuJoCo episodes, and the vla-mujoco benchmark's quick version."""

import json

import numpy as np
import pytest
import torch

gym = pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from mmtts.bench import run_benchmark  # noqa: E402
from mmtts.core.errors import MmttsError  # noqa: E402
from mmtts.modalities.vla import ActionSpace, ActionVerifier, GaussianPolicy, MLPActionScorer, RoboMonkeyPolicy  # noqa: E402
from mmtts.modalities.vla.gym_env import GymPolicy, run_episode  # noqa: E402
from mmtts.tasks.cache import ModelCache  # noqa: E402
from mmtts.tasks.vla_mujoco import (STATE_DIM, VERIFIER_CONFIG, GaussianMLP, VLAMujoco,  # noqa: E402
                                    arm_frame_features, expert_action, fingertip_distance, make_env, make_scorer,
                                    power_law_fit)


def untrained_wrapper(space, seed=0, n=4, k=8):
    torch.manual_seed(0)
    policy = GaussianPolicy(GaussianMLP(hidden=16), STATE_DIM)
    verifier = ActionVerifier(MLPActionScorer(STATE_DIM, space.dim, hidden=16))
    return RoboMonkeyPolicy(policy, verifier, space, n=k, policy_samples=n, seed=seed)


def test_scripted_expert_reaches_the_target():
    env = make_env()
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        for _ in range(50):
            obs, *_ = env.step(expert_action(obs).astype(np.float32))
        assert fingertip_distance(obs) < 1e-3


def test_wrapper_runs_gymnasium_episodes_with_reset_between_them():
    env = make_env()
    space = ActionSpace.from_gym(env.action_space)
    assert space.dim == 2 and space.low == (-1.0, -1.0)

    def episodes(seed):
        wrapper = untrained_wrapper(space, seed=seed)
        agent = GymPolicy(wrapper)
        actions, steps = [], []
        for ep in range(2):
            out = run_episode(env, agent, seed=100 + ep, on_step=lambda o, a, n, i: actions.append(a))
            steps.append(out["steps"])
            assert len(wrapper.diagnostics) == out["steps"]  # reset() emptied the previous episode's record
            assert wrapper.episode == ep and wrapper.step == out["steps"]
        return np.array(actions), steps

    a1, steps = episodes(seed=0)
    a2, _ = episodes(seed=0)
    a3, _ = episodes(seed=1)
    assert steps == [50, 50] and a1.shape == (100, 2) and a1.dtype == np.float32
    assert (np.abs(a1) <= 1).all()
    np.testing.assert_array_equal(a1, a2)  # same seed, same actions
    assert not np.array_equal(a1, a3)
    assert not np.array_equal(a1[:50], a1[50:])  # the second episode draws from new streams


def test_gym_policy_takes_vector_batches_and_rejects_bad_input():
    space = ActionSpace.box(-1, 1, dim=2)
    agent = GymPolicy(untrained_wrapper(space), instruction="reach the target")
    out = agent(np.zeros((3, STATE_DIM), dtype=np.float32))
    assert out.shape == (3, 2)
    with pytest.raises(MmttsError, match=r"expects \(B, 10\)"):
        agent(np.zeros(7))
    with pytest.raises(MmttsError, match="vector env batch"):
        agent(np.zeros((1, 2, 5)))
    with pytest.raises(MmttsError, match="LeRobot-style"):
        GymPolicy(object())


def rotate_scene(obs: np.ndarray, theta: float) -> np.ndarray:
    """The same Reacher state with the arm, the target and the fingertip turned by ``theta`` about the base."""
    out = obs.copy()
    q1 = np.arctan2(obs[..., 2], obs[..., 0]) + theta
    out[..., 0], out[..., 2] = np.cos(q1), np.sin(q1)
    c, s = np.cos(theta), np.sin(theta)
    for i in (4, 8):
        x, y = obs[..., i], obs[..., i + 1]
        out[..., i], out[..., i + 1] = c * x - s * y, s * x + c * y
    return out


def test_arm_frame_features_are_invariant_to_turning_the_scene():
    env = make_env()
    states = []
    for seed in range(4):
        obs, _ = env.reset(seed=seed)
        for _ in range(10):
            states.append(obs)
            obs, *_ = env.step(env.action_space.sample())
    states = np.array(states)
    turned = rotate_scene(states, 1.3)
    # the symmetry is real: the expert acts the same in the turned scene
    np.testing.assert_allclose(expert_action(turned), expert_action(states), atol=1e-6)
    feats = arm_frame_features()
    f, f_turned = feats(torch.tensor(states, dtype=torch.float32)), feats(torch.tensor(turned, dtype=torch.float32))
    assert f.shape == (40, 8) and torch.allclose(f, f_turned, atol=1e-5)
    assert not torch.allclose(f[:, 4:6], torch.tensor(states[:, 4:6], dtype=torch.float32))  # not the raw target
    scorer = make_scorer(VERIFIER_CONFIG)
    scorer.set_normalisation(torch.tensor(states, dtype=torch.float32))
    acts = torch.rand(40, 1, 2) * 2 - 1
    with torch.no_grad():
        s1 = scorer({"observation.state": torch.tensor(states, dtype=torch.float32)}, acts)
        s2 = scorer({"observation.state": torch.tensor(turned, dtype=torch.float32)}, acts)
    assert torch.allclose(s1, s2, atol=1e-4)


def test_power_law_fit_recovers_its_parameters():
    k = np.array([1, 2, 4, 8, 16, 32])
    a, b = power_law_fit(k, 0.3 * k ** -0.25)
    assert abs(a - 0.3) < 1e-9 and abs(b + 0.25) < 1e-9


def test_quick_benchmark_writes_results_and_single_sample_equals_the_policy(cache_dir, tmp_path):
    task = VLAMujoco(quick=True)
    res = run_benchmark(task, [0, 1], list(task.quick_budgets), out=tmp_path,
                        settings=list(task.quick_settings))
    for name in ("vla-mujoco.json", "vla-mujoco.md", "vla-mujoco.png", "vla-mujoco-power-law.png"):
        assert (tmp_path / name).exists()
    rows = {(r["method"], r["budget"]): r["metrics"] for r in res["rows"]}
    for key in ("success", "final_distance", "action_error", "ms_per_step"):
        assert key in rows[("policy", 1)]
    # N = K = 1 through the wrapper is the policy itself: identical episodes
    for key in ("success", "final_distance", "action_error"):
        assert rows[("robomonkey", 1)][key] == rows[("policy", 1)][key]
    assert rows[("robomonkey", 8)]["candidates"] > 4
    saved = json.loads((tmp_path / "vla-mujoco.json").read_text())
    assert "in-distribution" in saved["task_config"]["power_laws"]
    assert any(name.startswith("power law") for name in saved["references"])
    # a second instance reuses the cached models and, on the same seed, repeats the run exactly
    assert ModelCache().has("vla-mujoco-policy", task.policy_config)
    again = VLAMujoco(quick=True).run("robomonkey", "in-distribution", 8, 1)
    first = next(r for r in res["rows"] if r["method"] == "robomonkey" and r["budget"] == 8)["per_seed"]
    assert again["action_error"] == first["action_error"][1]


def test_bad_task_options_and_settings():
    with pytest.raises(MmttsError, match="no option"):
        VLAMujoco(quick=True, horizon=3)
    with pytest.raises(MmttsError, match="no setting"):
        VLAMujoco(quick=True).run("policy", "moon", 1, 0)
