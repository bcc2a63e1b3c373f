"""The RLlib side of a search (`entropy_search.rl.algorithm`): the algorithm config built from a search config
(whole episodes per env runner, the env config each runner builds its environments from) and the callback
that brings every candidate to the driver."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from entropy_search.config import load_config

pytest.importorskip("ray")

from ray.rllib.core import DEFAULT_MODULE_ID  # noqa: E402

from entropy_search.envs import OBS_DIM, PruningEnv, env_config  # noqa: E402
from entropy_search.rl.algorithm import (  # noqa: E402
    CANDIDATES_KEY,
    CandidateCallback,
    build_algorithm_config,
    set_initial_std,
)


def test_ppo_config_samples_whole_episodes_on_every_env_runner():
    config = load_config({"resources": {"num_env_runners": 3, "num_cpus_per_env_runner": 0.5,
                                        "num_gpus_per_env_runner": 0.25, "num_envs_per_env_runner": 2},
                          "agent": {"episodes_per_iteration": 12}})
    algo = build_algorithm_config(config, n_steps=10, env_config=env_config(config))
    assert type(algo).__name__ == "PPOConfig"
    assert algo.num_env_runners == 3 and algo.num_gpus_per_env_runner == 0.25 and algo.num_cpus_per_env_runner == 0.5
    assert algo.gamma == 1.0 and algo.rollout_fragment_length == 2 * 10  # whole episodes per env
    assert algo.train_batch_size_per_learner == 3 * 2 * 2 * 10
    assert algo.minibatch_size == algo.train_batch_size_per_learner // config.agent.num_minibatches
    assert algo.seed == config.seed


def test_env_runners_build_their_environments_from_the_env_config(tmp_path):
    config = load_config({"output": {"dir": str(tmp_path)}})
    cfg = env_config(config, tmp_path / "warm.jsonl")
    algo = build_algorithm_config(config, n_steps=4, env_config=cfg)
    assert algo.env is PruningEnv
    assert dict(algo.env_config) == cfg and algo.env_config is not cfg  # a copy: the caller's dict stays its own
    assert algo.callbacks_class is CandidateCallback


def test_sac_config():
    config = load_config({"agent": {"algorithm": "sac", "learning_starts_episodes": 4, "train_batch_size": 32}})
    sac = build_algorithm_config(config, n_steps=10, env_config=env_config(config))
    assert type(sac).__name__ == "SACConfig" and sac.gamma == 1.0
    assert sac.num_steps_sampled_before_learning_starts == 4 * 10 and sac.train_batch_size_per_learner == 32


def test_env_config_is_required():
    config = load_config({})
    with pytest.raises(TypeError, match="env_config"):
        build_algorithm_config(config, 10)


class _Episode:
    def __init__(self, info):
        self.info = info

    def get_infos(self, index):
        assert index == -1
        return self.info


class _Logger:
    def __init__(self):
        self.logged = []

    def log_value(self, key, value, reduce=None):
        self.logged.append((key, value, reduce))


def test_callback_reports_the_terminal_info_of_each_episode():
    logger = _Logger()
    info = {"kept_channels": [3, 4], "reward": -1.5}
    CandidateCallback().on_episode_end(episode=_Episode(info), metrics_logger=logger)
    assert logger.logged == [(CANDIDATES_KEY, info, "item_series")]
    CandidateCallback().on_episode_end(episode=_Episode({"group": 1}), metrics_logger=logger)  # not a candidate
    CandidateCallback().on_episode_end(episode=_Episode(None), metrics_logger=logger)
    CandidateCallback().on_episode_end(episode=_Episode(info), metrics_logger=None)
    assert len(logger.logged) == 1


@pytest.mark.parametrize("std", [0.3, 1.0])
def test_the_policy_starts_at_the_initial_std_for_every_state(std):
    config = load_config({"agent": {"initial_std": std}})
    algo = build_algorithm_config(config, n_steps=4, env_config=env_config(config))
    obs_space = gym.spaces.Box(0.0, 1.0, shape=(OBS_DIM,), dtype=np.float32)
    act_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
    module = algo.get_rl_module_spec(env=None, spaces={DEFAULT_MODULE_ID: (obs_space, act_space)}).build()
    obs = torch.rand(64, OBS_DIM)
    before = module.forward_exploration({"obs": obs})["action_dist_inputs"][:, 1]
    assert before.std() > 1e-4  # RLlib's start: a log-std that depends on the state
    set_initial_std(module, std)
    out = module.forward_exploration({"obs": obs})["action_dist_inputs"]
    assert torch.allclose(out[:, 1], torch.full((64,), float(np.log(std))), atol=1e-6)
    assert out[:, 0].std() > 0  # the means still depend on the state
    assert callable(algo.callbacks_on_algorithm_init)
