"""The pruning environment (`entropy_search.envs`): the budget's clipping step by step, observation bounds,
determinism, the per-process problem and its cache, the plain env config, and Gymnasium's check_env."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import space_of
from gymnasium.utils.env_checker import check_env

from entropy_search.config import config_from_dict, load_config
from entropy_search.envs import OBS_DIM, PruningEnv, env_config, get_problem, process_stats, share_cache
from entropy_search.jsonio import write_jsonl
from entropy_search.problem import Budget, CandidateCache, Network, Problem, SimulatedEvaluator


def sim_problem(name="digits_cnn", target=0.5, min_keep=0.1, round_to=1, cache=True, floor=0.0) -> Problem:
    """A problem whose evaluation is simulated (no data, no checkpoint): for the budget and observation properties."""
    space = space_of(name, round_to)
    budget = Budget(space, target, min_keep, floor)
    budget.check()
    evaluator = SimulatedEvaluator(space, 1e-6)
    return Problem(Network(space.model, space.example_input), None, space, budget, evaluator,
                   CandidateCache(space, evaluator, "entropy", enabled=cache), load_config({}))


def sim_env(*args, **kwargs) -> PruningEnv:
    return PruningEnv(problem=sim_problem(*args, **kwargs))


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


def clipped(budget: Budget, actions) -> tuple[list[int], list[int]]:
    """The candidate `Budget` makes of these actions on its own (tests/test_budget.py checks its properties): the
    blocks dropped (one action per residual block first), then the channel counts under their budget."""
    blocks = len(budget.space.blocks)
    dropped: set[int] = set()
    for b, a in enumerate(actions[:blocks]):
        if budget.block_step(dropped, b, float(a))[0]:
            dropped.add(b)
    shallow = budget.given(dropped)
    counts: list[int] = []
    for a in actions[blocks:]:
        counts.append(shallow.step(counts, float(a))[0])
    return sorted(dropped), counts


# ---------------------------------------------------------------- the budget, step by step


@pytest.mark.parametrize("name, round_to, target, floor", [
    ("digits_cnn", 1, 0.2, 0.0), ("resnet20", 8, 0.5, 0.9), ("mobilenet_v2", 8, 0.3, 0.0),
])
def test_episodes_are_the_budgets_clipping_and_meet_the_target(name, round_to, target, floor):
    env = sim_env(name, target, 0.1, round_to, floor=floor)
    rng = np.random.default_rng(0)
    n, blocks = env.n_steps, env.n_blocks
    assert blocks == len(env.space.blocks) > 0 and n == blocks + env.n_groups
    depths = set()
    for actions in [np.ones(n), -np.ones(n), np.full(n, 5.0)] + [rng.uniform(-1, 1, n) for _ in range(10)]:
        actions = actions.astype(np.float32)  # what the env sees
        _, _, infos = rollout(env, actions)
        final = infos[-1]
        dropped, counts = clipped(env.budget, actions)
        assert final["kept_channels"] == counts
        assert final["dropped_blocks"] == env.space.dropped_names(dropped)
        assert final["blocks_kept"] == blocks - len(dropped)
        depths.add(final["blocks_kept"])
        assert final["macs"] <= target * env.space.base_macs, (name, target, actions)
        # analytic count of the rounded candidate, without its dropped blocks
        assert final["macs"] == env.space.macs(final["keep"], final["dropped_blocks"])
        assert env.space.kept_channels(final["keep"]) == final["kept_channels"]
        assert final["actions"] == pytest.approx(actions.tolist())
        if floor:
            assert final["macs"] >= floor * target * env.space.base_macs * 0.9, "blocks dropped keep the floor reachable"
        # each step tells which block or group it decided, what it kept, and whether the budget clipped it
        shallow = env.budget.given(dropped)
        for b, step in enumerate(infos[1:blocks + 1]):
            assert step["block"] == b and step["dropped"] == (b in dropped)
        for g, step in enumerate(infos[blocks + 1:-1]):
            count, keep, was_clipped = shallow.step(final["kept_channels"][:g], float(actions[blocks + g]))
            assert final["desired_keep"][g] == keep
            assert step["group"] == g and step["clipped"] == was_clipped
            assert step["keep"] == count / env.budget.groups[g].channels
    assert len(depths) > 1, "episodes choose depth"


def test_nan_action_is_treated_as_min_keep_and_drops_blocks():
    env = sim_env()
    _, _, infos = rollout(env, [float("nan")] * env.n_steps)
    every = range(env.n_blocks)
    assert infos[-1]["kept_channels"] == env.budget.given(every).min_counts
    assert infos[-1]["dropped_blocks"] == env.space.dropped_names(every)


# ---------------------------------------------------------------- observations


def test_observations_are_in_bounds_and_informative():
    env = sim_env("mobilenet_v2", 0.3, 0.1, 8)
    assert env.observation_space.shape == (OBS_DIM,)
    rng = np.random.default_rng(1)
    for _ in range(5):
        observations, _, _ = rollout(env, rng.uniform(-1, 1, env.n_steps))
        for obs in observations:
            assert obs.dtype == np.float32
            assert env.observation_space.contains(obs)
        stack = np.stack(observations[:-1])
        assert np.allclose(stack[:, 0], np.arange(env.n_steps) / (env.n_steps - 1), atol=1e-6)  # index
        assert np.all(np.diff(stack[:, 10]) >= -1e-6)  # FLOPs removed so far never decreases
        assert np.all(np.diff(stack[:, 11]) <= 1e-6)  # FLOPs still to come never increases
    types = {tuple(o[[1, 2, 3, 13]]) for o in env.static_obs}
    assert len(types) == 3  # residual blocks, conv and depthwise groups are told apart
    assert env.static_obs[: env.n_blocks, 13].all() and not env.static_obs[env.n_blocks :, 13].any()


def test_step_after_the_end_raises():
    env = sim_env()
    rollout(env, np.zeros(env.n_steps))
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(1, dtype=np.float32))


def test_env_needs_a_config_or_a_problem():
    with pytest.raises(ValueError, match="env_config"):
        PruningEnv({})
    with pytest.raises(ValueError, match="env_config"):
        PruningEnv()


def test_simulated_problem_answers_repeats_from_its_cache():
    problem = sim_problem()
    env_a, env_b = PruningEnv(problem=problem), PruningEnv(problem=problem)
    actions = [0.3, 0.3, -0.2, 0.5, 0.1]  # the block, then the four groups
    _, _, first = rollout(env_a, actions)
    _, _, second = rollout(env_b, actions)
    assert first[-1]["cache_hit"] is False and second[-1]["cache_hit"] is True
    assert problem.cache.stats["evaluations"] == 1 and problem.cache.stats["cache_hits"] == 1
    # with the block dropped, its group's action changes nothing: the same candidate
    _, _, shallow = rollout(env_a, [-0.5, 0.3, -0.2, 0.5, 0.1])
    _, _, again = rollout(env_b, [-0.5, 0.3, 0.9, 0.5, 0.1])
    assert shallow[-1]["dropped_blocks"] == ["block"] and again[-1]["cache_hit"] is True
    uncached = sim_problem(cache=False)
    env = PruningEnv(problem=uncached)
    rollout(env, actions)
    _, _, again = rollout(env, actions)
    assert again[-1]["cache_hit"] is False and uncached.cache.stats["evaluations"] == 2


# ---------------------------------------------------------------- with the real evaluator


@pytest.fixture(scope="module")
def digits_config(tmp_path_factory, train_digits_checkpoint):
    """A (briefly trained) digits CNN saved as a checkpoint, and a search config that points at it."""
    path = train_digits_checkpoint(tmp_path_factory.mktemp("ckpt") / "digits.pt", epochs=2)
    return load_config({"model": {"checkpoint": str(path)}, "data": {"eval_batch": 128},
                        "search": {"flops_target": 0.5, "device": "cpu", "reward": "entropy"}})


@pytest.fixture(scope="module")
def digits_setup(digits_config):
    """The plain dict an env runner builds its environments from."""
    return env_config(digits_config)


def test_env_config_is_plain_json_and_holds_the_resolved_config(digits_config, tmp_path):
    cfg = env_config(digits_config)
    assert json.loads(json.dumps(cfg)) == cfg
    assert config_from_dict(cfg["config"]) == digits_config
    assert cfg["warm_cache"] is None
    assert env_config(digits_config, tmp_path / "warm.jsonl")["warm_cache"] == str(tmp_path / "warm.jsonl")


def test_check_env_passes(digits_setup):
    env = PruningEnv(digits_setup)
    check_env(env, skip_render_check=True)


def test_terminal_info_carries_every_measurement(digits_setup):
    env = PruningEnv(digits_setup)
    _, rewards, infos = rollout(env, np.linspace(-1, 1, env.n_steps))
    info = infos[-1]
    for key in ("keep", "kept_channels", "macs", "params", "macs_ratio", "params_ratio", "entropy", "accuracy",
                "eval_seconds", "cache_hit", "reward", "actions", "desired_keep", "worker", "dropped_blocks",
                "blocks_kept"):
        assert key in info, key
    assert info["reward"] == pytest.approx(-info["entropy"])  # the entropy reward is minus the entropy
    assert rewards[:-1] == [0.0] * (env.n_steps - 1)
    assert rewards[-1] == info["reward"]
    assert 0.0 <= info["accuracy"] <= 1.0 and info["entropy"] > 0
    assert math.isclose(info["macs_ratio"], info["macs"] / env.space.base_macs)


def test_determinism_for_a_fixed_seed_and_actions(digits_config):
    from entropy_search.problem import setup

    actions = np.random.default_rng(3).uniform(-1, 1, 5)
    results = []
    for _ in range(2):
        env = PruningEnv(problem=setup(digits_config))  # two separate builds
        observations, rewards, infos = rollout(env, actions, seed=123)
        results.append((observations, rewards, infos[-1]))
    (o1, r1, i1), (o2, r2, i2) = results
    assert all(np.array_equal(a, b) for a, b in zip(o1, o2, strict=True))
    assert r1 == r2
    for key in ("kept_channels", "keep", "macs", "params", "entropy", "accuracy", "reward"):
        assert i1[key] == i2[key], key


def test_cache_hits_and_shared_problem(digits_config):
    from entropy_search.problem import setup

    problem = setup(digits_config)
    env_a, env_b = PruningEnv(problem=problem), PruningEnv(problem=problem)
    actions = [0.3, 0.3, -0.2, 0.5, 0.1]
    _, _, first = rollout(env_a, actions)
    _, _, second = rollout(env_b, actions)  # another env of the same worker: answered from the cache
    assert first[-1]["cache_hit"] is False and second[-1]["cache_hit"] is True
    assert first[-1]["reward"] == second[-1]["reward"]
    assert problem.cache.stats["evaluations"] == 1 and problem.cache.stats["cache_hits"] == 1
    # candidates evaluated on another worker are shared in and then answered from the cache
    other = dict(first[-1], kept_channels=[c - 1 for c in first[-1]["kept_channels"]], reward=42.0)
    assert problem.cache.add([other]) == 1
    assert problem.evaluate(other["kept_channels"])[0]["reward"] == 42.0


def test_env_builds_its_problem_from_the_config_dict_once_per_process(digits_config, digits_setup):
    from entropy_search.envs.pruning_env import _PROBLEMS

    env1, env2 = PruningEnv(digits_setup), PruningEnv(digits_setup)
    assert env1.problem is env2.problem is get_problem(digits_setup)  # network, groups, batches built once
    assert env1.problem in _PROBLEMS.values()
    other = env_config(load_config(digits_config.to_dict(), {"search.reward": "accuracy"}))
    assert PruningEnv(other).problem is not env1.problem


def test_shared_candidates_reach_every_problem_of_the_process(digits_config, digits_setup):
    problem = get_problem(digits_setup)
    full = [g.channels for g in problem.space.groups]
    shared = {"kept_channels": [max(1, c // 3) for c in full], "reward": 7.0, "entropy": 1.0, "cache_hit": False,
              "worker": 1, "actions": [0.0] * len(full)}
    before = process_stats()
    assert share_cache([shared]) >= 1
    assert share_cache([shared]) == 0  # nothing new the second time
    record, hit = problem.evaluate(shared["kept_channels"])
    assert hit and record["reward"] == 7.0
    assert "worker" not in record and "actions" not in record  # episode keys stay out of the cache
    after = process_stats()
    assert after["cache_hits"] == before["cache_hits"] + 1 and after["evaluations"] == before["evaluations"]


def test_warm_cache_file_is_loaded_when_the_problem_is_built(digits_config, digits_setup, tmp_path):
    """A resumed search hands its evaluated candidates to new env runners through a warm-cache file, which the driver
    appends to after every iteration (an env runner RLlib restarted starts from it)."""
    groups = get_problem(digits_setup).space.groups
    counts = [max(1, g.channels // 2) for g in groups]
    warm = write_jsonl(tmp_path / "warm.jsonl", [{"kept_channels": counts, "reward": -3.0, "entropy": 3.0}])
    fresh = load_config(digits_config.to_dict(), {"seed": 12})  # a problem no other test built
    env = PruningEnv(env_config(fresh, warm))
    record, hit = env.problem.evaluate(counts)
    assert hit and record["reward"] == -3.0
    assert env.problem.cache.stats["evaluations"] == 0
    # appended to during the search: each episode starts with what was appended, whole lines only
    later, last = ([max(1, g.channels // k) for g in groups] for k in (4, 8))
    row = json.dumps({"kept_channels": last, "reward": -5.0, "entropy": 5.0}) + "\n"
    with open(warm, "a") as fh:
        fh.write(json.dumps({"kept_channels": later, "reward": -4.0, "entropy": 4.0}) + "\n")
        fh.write(row[:20])  # a batch still being written
    env.reset(seed=0)
    record, hit = env.problem.evaluate(later)
    assert hit and record["reward"] == -4.0 and len(env.problem.cache) == 2
    with open(warm, "a") as fh:
        fh.write(row[20:])
    env.reset(seed=0)
    record, hit = env.problem.evaluate(last)  # read once whole
    assert hit and record["reward"] == -5.0 and len(env.problem.cache) == 3


@pytest.mark.parametrize("reward", ["accuracy", "accuracy_flops"])
def test_accuracy_rewards(digits_config, reward):
    env = PruningEnv(env_config(load_config(digits_config.to_dict(), {"search.reward": reward})))
    _, rewards, infos = rollout(env, np.zeros(env.n_steps))
    info = infos[-1]
    if reward == "accuracy":
        assert rewards[-1] == pytest.approx(info["accuracy"])
    else:
        assert rewards[-1] == pytest.approx(-(1 - info["accuracy"]) * math.log(info["macs"]))
