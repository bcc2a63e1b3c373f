"""The pruning environment: budget always met, observation bounds, determinism, cache, check_env."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from entropy_search.envs import OBS_DIM, Budget, PruningEnv, make_context
from entropy_search.errors import ConfigError
from entropy_search.models import create_model
from entropy_search.space import PruningSpace

_SPACES: dict = {}


def space_of(name: str, round_to: int = 1) -> PruningSpace:
    """Pruning spaces are built once per test session (DepGraph takes a second on the bigger nets)."""
    key = (name, round_to)
    if key not in _SPACES:
        torch.manual_seed(0)
        shape = (1, 1, 8, 8) if name == "digits_cnn" else (1, 3, 32, 32)
        _SPACES[key] = PruningSpace(create_model(name).eval(), torch.zeros(shape), round_to=round_to)
    return _SPACES[key]


def sim_env(name="digits_cnn", target=0.5, min_keep=0.1, round_to=1, cache=True, floor=0.0) -> PruningEnv:
    """An environment whose evaluation is simulated (no data): for the budget and observation properties."""
    space = space_of(name, round_to)
    budget = Budget(space, target, min_keep, floor)
    budget.check()
    ctx = make_context(space, budget, None, {"simulate_eval_seconds": 1e-6, "cache": cache})
    return PruningEnv({}, context=ctx)


def rollout(env: PruningEnv, actions, seed=None):
    obs, info = env.reset(seed=seed)
    observations, rewards, infos = [obs], [], [info]
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(np.asarray([a], dtype=np.float32))
        observations.append(obs)
        rewards.append(reward)
        infos.append(info)
        if terminated or truncated:
            break
    assert terminated and not truncated
    return observations, rewards, infos


# ---------------------------------------------------------------- budget


@pytest.mark.parametrize(
    "name, round_to, targets",
    [
        ("digits_cnn", 1, (0.05, 0.2, 0.5, 0.9)),
        ("digits_cnn", 4, (0.1, 0.5)),
        ("resnet20", 1, (0.1, 0.33, 0.5)),
        ("resnet20", 8, (0.2, 0.5)),
        ("mobilenet_v2", 8, (0.2, 0.5)),
    ],
)
def test_budget_always_met_over_random_action_sequences(name, round_to, targets):
    rng = np.random.default_rng(0)
    for target in targets:
        for min_keep, floor in ((0.05, 0.0), (0.2, 0.9)):
            env = sim_env(name, target, min_keep, round_to, floor=floor)
            above_floor = 0
            n = env.n_groups
            sequences = [np.ones(n), -np.ones(n), np.full(n, 5.0), np.full(n, -7.0)]
            sequences += [rng.uniform(-1, 1, n) for _ in range(40)]
            sequences += [rng.choice([-1.0, 1.0], n) for _ in range(10)]
            sequences += [rng.normal(0, 3, n) for _ in range(10)]  # unclipped Gaussian actions
            for actions in sequences:
                _, _, infos = rollout(env, actions)
                final = infos[-1]
                assert final["macs"] <= target * env.space.base_macs, (name, target, actions)
                assert final["macs"] == env.space.macs(final["keep"])  # analytic count of the rounded candidate
                assert env.space.kept_channels(final["keep"]) == final["kept_channels"]
                assert all(min_keep - 1e-9 <= k <= 1.0 for k in final["desired_keep"])
                assert all(0 < k <= 1 for k in final["keep"])
                above_floor += final["macs"] >= floor * target * env.space.base_macs
            # the floor is soft (rounding can make it unreachable) but met almost always
            assert above_floor >= (len(sequences) if round_to == 1 else 0.9 * len(sequences)), (name, target)


def test_clipping_keeps_as_much_as_the_budget_allows():
    """With 'keep everything' actions each group keeps the largest count that leaves the target reachable."""
    env = sim_env("resnet20", 0.5, 0.1)
    _, _, infos = rollout(env, np.ones(env.n_groups))
    counts = infos[-1]["kept_channels"]
    budget = env.budget
    for g in range(budget.n):
        opts = budget.options[g].tolist()
        i = opts.index(counts[g])
        if i + 1 < len(opts):
            trial = counts[:g] + [opts[i + 1]] + budget.min_counts[g + 1:]
            assert env.space.macs_of_counts(trial) > budget.target_macs
    assert infos[-1]["macs_ratio"] > 0.45  # the budget is used, not wasted


def test_floor_makes_candidates_use_the_budget():
    """With the floor, even 'prune everything' actions give a network of about the target's cost."""
    for floor in (0.5, 0.9):
        env = sim_env("resnet20", 0.5, 0.1, floor=floor)
        _, _, infos = rollout(env, -np.ones(env.n_groups))
        assert floor * 0.5 <= infos[-1]["macs_ratio"] <= 0.5
    env = sim_env("resnet20", 0.5, 0.1, floor=0.0)
    _, _, infos = rollout(env, -np.ones(env.n_groups))
    assert infos[-1]["kept_channels"] == env.budget.min_counts  # AMC's one-sided clipping


def test_nan_action_is_treated_as_min_keep():
    env = sim_env()
    _, _, infos = rollout(env, [float("nan")] * env.n_groups)
    assert infos[-1]["kept_channels"] == env.budget.min_counts


def test_unreachable_target_is_a_config_error():
    with pytest.raises(ConfigError, match="search.flops_target"):
        sim_env("digits_cnn", target=0.001, min_keep=0.5)


# ---------------------------------------------------------------- observations


def test_observations_are_in_bounds_and_informative():
    env = sim_env("mobilenet_v2", 0.3, 0.1, 8)
    assert env.observation_space.shape == (OBS_DIM,)
    rng = np.random.default_rng(1)
    for _ in range(5):
        observations, _, _ = rollout(env, rng.uniform(-1, 1, env.n_groups))
        for obs in observations:
            assert obs.dtype == np.float32
            assert env.observation_space.contains(obs)
        stack = np.stack(observations[:-1])
        assert np.allclose(stack[:, 0], np.arange(env.n_groups) / (env.n_groups - 1), atol=1e-6)  # index
        assert np.all(np.diff(stack[:, 10]) >= -1e-6)  # FLOPs removed so far never decreases
        assert np.all(np.diff(stack[:, 11]) <= 1e-6)  # FLOPs still to come never increases
    types = {tuple(o[1:4]) for o in env.ctx.static_obs}
    assert len(types) == 2  # conv and depthwise groups are told apart


def test_step_after_the_end_raises():
    env = sim_env()
    rollout(env, np.zeros(env.n_groups))
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(1, dtype=np.float32))


# ---------------------------------------------------------------- with the real evaluator


@pytest.fixture(scope="module")
def digits_setup(tmp_path_factory, train_digits_checkpoint):
    """A (briefly trained) digits CNN saved as a checkpoint, and the env config that points at it."""
    from entropy_search.config import load_config

    path = train_digits_checkpoint(tmp_path_factory.mktemp("ckpt") / "digits.pt", epochs=2, with_metrics=False)
    config = load_config({"model": {"checkpoint": str(path)}, "data": {"eval_batch": 128},
                          "search": {"flops_target": 0.5, "device": "cpu"}})
    return config.env_config()


def test_check_env_passes(digits_setup):
    env = PruningEnv(digits_setup)
    check_env(env, skip_render_check=True)


def test_terminal_info_carries_every_measurement(digits_setup):
    env = PruningEnv(digits_setup)
    _, rewards, infos = rollout(env, np.linspace(-1, 1, env.n_groups))
    info = infos[-1]
    for key in ("keep", "kept_channels", "macs", "params", "macs_ratio", "params_ratio", "entropy", "accuracy",
                "eval_seconds", "cache_hit", "reward"):
        assert key in info, key
    assert info["reward"] == pytest.approx(-info["entropy"])  # the default reward is minus the entropy
    assert rewards[:-1] == [0.0] * (env.n_groups - 1)
    assert rewards[-1] == info["reward"]
    assert 0.0 <= info["accuracy"] <= 1.0 and info["entropy"] > 0
    assert math.isclose(info["macs_ratio"], info["macs"] / env.space.base_macs)


def test_determinism_for_a_fixed_seed_and_actions(digits_setup):
    from entropy_search.envs.pruning_env import build_context

    actions = np.random.default_rng(3).uniform(-1, 1, 4)
    results = []
    for _ in range(2):
        env = PruningEnv(digits_setup, context=build_context(digits_setup))  # two separate builds
        observations, rewards, infos = rollout(env, actions, seed=123)
        results.append((observations, rewards, infos[-1]))
    (o1, r1, i1), (o2, r2, i2) = results
    assert all(np.array_equal(a, b) for a, b in zip(o1, o2, strict=True))
    assert r1 == r2
    for key in ("kept_channels", "keep", "macs", "params", "entropy", "accuracy", "reward"):
        assert i1[key] == i2[key], key


def test_cache_hits_and_shared_context(digits_setup):
    from entropy_search.envs.pruning_env import build_context

    ctx = build_context(digits_setup)
    env_a, env_b = PruningEnv(digits_setup, context=ctx), PruningEnv(digits_setup, context=ctx)
    actions = [0.3, -0.2, 0.5, 0.1]
    _, _, first = rollout(env_a, actions)
    _, _, second = rollout(env_b, actions)  # another env of the same worker: answered from the cache
    assert first[-1]["cache_hit"] is False and second[-1]["cache_hit"] is True
    assert first[-1]["reward"] == second[-1]["reward"]
    assert ctx.stats["evaluations"] == 1 and ctx.stats["cache_hits"] == 1
    # candidates evaluated on another worker are shared in and then answered from the cache
    other = dict(first[-1], kept_channels=[c - 1 for c in first[-1]["kept_channels"]], reward=42.0)
    assert ctx.add_to_cache([other]) == 1
    assert ctx.evaluate(other["kept_channels"])[0]["reward"] == 42.0


def test_env_builds_itself_from_the_config_dict_once_per_process(digits_setup):
    from entropy_search.envs.pruning_env import _CONTEXTS, get_context

    env1, env2 = PruningEnv(digits_setup), PruningEnv(digits_setup)
    assert env1.ctx is env2.ctx is get_context(digits_setup)  # network, groups, batches built once
    assert env1.ctx in _CONTEXTS.values()
    other = dict(digits_setup, reward="accuracy")
    assert PruningEnv(other).ctx is not env1.ctx


@pytest.mark.parametrize("reward", ["accuracy", "accuracy_flops"])
def test_accuracy_rewards(digits_setup, reward):
    env = PruningEnv(dict(digits_setup, reward=reward))
    _, rewards, infos = rollout(env, np.zeros(env.n_groups))
    info = infos[-1]
    if reward == "accuracy":
        assert rewards[-1] == pytest.approx(info["accuracy"])
    else:
        assert rewards[-1] == pytest.approx(-(1 - info["accuracy"]) * math.log(info["macs"]))
