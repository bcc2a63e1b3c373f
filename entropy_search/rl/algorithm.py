"""The RLlib side of a search: the algorithm config (new API stack; PPO by default, SAC as an option) and
the callback that brings every evaluated candidate to the driver (docs/design.md, "The agent")."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.algorithms.sac import SACConfig
from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

from ..config import SearchConfig
from ..envs import OBS_DIM, PruningEnv

#: Key of the episode infos the callback logs; the driver reads them from each iteration's result.
CANDIDATES_KEY = "candidates"


class CandidateCallback(RLlibCallback):
    """Report every finished episode's candidate (the terminal step's info) to the driver."""

    def on_episode_end(self, *, episode, metrics_logger=None, **kwargs) -> None:
        info = episode.get_infos(-1)
        if metrics_logger is not None and isinstance(info, dict) and "kept_channels" in info:
            metrics_logger.log_value(CANDIDATES_KEY, info, reduce="item_series")


def set_initial_std(module, std: float) -> None:
    """Make a PPO module's Gaussian policy have standard deviation `std` for every state: the log-std outputs
    of its policy head get zero weights and bias log(std) (the means are left as they are)."""
    last = [m for m in module.pi.modules() if isinstance(m, torch.nn.Linear)][-1]
    half = last.out_features // 2
    with torch.no_grad():
        last.weight[half:].zero_()
        last.bias[half:].fill_(math.log(std))


def initial_std_setter(std: float) -> Callable[..., None]:
    """An `on_algorithm_init` callback that starts PPO's policy at standard deviation `std` (`set_initial_std`
    on the learner's module, then the env runners get the weights, waiting for them so that the first
    iteration samples with it). RLlib starts at std ~1, so with actions clipped to [-1, 1] about 40% of the
    first candidates' actions sit at a bound (docs/design.md, "The agent")."""

    def on_algorithm_init(*, algorithm, **kwargs) -> None:
        algorithm.learner_group.foreach_learner(lambda learner: set_initial_std(learner.module[DEFAULT_MODULE_ID], std))
        algorithm.env_runner_group.sync_weights(from_worker_or_learner_group=algorithm.learner_group,
                                                inference_only=True, timeout_seconds=60.0)

    return on_algorithm_init


def adaptive_learner_state(algorithm) -> dict:
    """What RLlib's checkpoint of the learner leaves out: PPO's adaptive KL coefficient per module (the new
    stack's PPOLearner keeps it outside `get_state`, so a restored PPO starts again from `kl_coeff`; cf.
    ray-project/ray#22444 for the old stack). Plain JSON for state.json; {} for SAC."""

    def read(learner) -> dict:
        coeffs = getattr(learner, "curr_kl_coeffs_per_module", {})
        return {"kl_coeffs": {str(module): float(value.item()) for module, value in coeffs.items()}}

    found = [result.get() for result in algorithm.learner_group.foreach_learner(read)]  # one learner
    return found[0] if found and found[0]["kl_coeffs"] else {}


def restore_adaptive_learner_state(algorithm, state: dict) -> None:
    """Set what `adaptive_learner_state` saved, after RLlib's own restore (a resumed search then updates its
    policy exactly as the uninterrupted one did)."""
    coeffs = state.get("kl_coeffs") or {}
    if not coeffs:
        return

    def write(learner) -> None:
        for module, value in coeffs.items():
            learner.curr_kl_coeffs_per_module[module].data.fill_(value)

    algorithm.learner_group.foreach_learner(write)


def build_algorithm_config(config: SearchConfig, n_steps: int, env_config: dict) -> AlgorithmConfig:
    """The RLlib AlgorithmConfig of a search (new API stack). `n_steps` = steps per episode; `env_config`
    is what each env runner builds its environments from (`entropy_search.envs.env_config`)."""
    agent, res = config.agent, config.resources
    env_config = dict(env_config)
    runners = max(res.num_env_runners, 1) * res.num_envs_per_env_runner
    episodes_per_runner = max(1, math.ceil(agent.episodes_per_iteration / runners))
    fragment = episodes_per_runner * n_steps
    batch = fragment * runners
    obs_space = gym.spaces.Box(0.0, 1.0, shape=(OBS_DIM,), dtype=np.float32)
    act_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

    if agent.algorithm == "ppo":
        algo = PPOConfig().training(
            gamma=agent.gamma,
            lr=agent.lr,
            lambda_=agent.gae_lambda,
            clip_param=agent.clip_param,
            entropy_coeff=agent.entropy_coeff,
            vf_loss_coeff=agent.vf_loss_coeff,
            train_batch_size_per_learner=batch,
            minibatch_size=max(1, batch // agent.num_minibatches),
            num_epochs=agent.num_epochs,
        )
        model = DefaultModelConfig(
            fcnet_hiddens=list(agent.hidden_sizes), fcnet_activation=agent.activation, vf_share_layers=False
        )
    else:
        training: dict[str, Any] = dict(
            gamma=agent.gamma,
            actor_lr=agent.actor_lr,
            critic_lr=agent.critic_lr,
            alpha_lr=agent.alpha_lr,
            tau=agent.tau,
            initial_alpha=agent.initial_alpha,
            train_batch_size_per_learner=agent.train_batch_size,
            num_steps_sampled_before_learning_starts=agent.learning_starts_episodes * n_steps,
            replay_buffer_config={"type": "PrioritizedEpisodeReplayBuffer", "capacity": agent.replay_capacity,
                                  "alpha": 0.6, "beta": 0.4},
        )
        if agent.training_intensity is not None:
            training["training_intensity"] = agent.training_intensity
        algo = SACConfig().training(**training).reporting(min_sample_timesteps_per_iteration=batch)
        model = DefaultModelConfig(fcnet_hiddens=list(agent.hidden_sizes), fcnet_activation=agent.activation)

    init = {"on_algorithm_init": initial_std_setter(agent.initial_std)} if agent.algorithm == "ppo" else {}
    return (
        algo.environment(PruningEnv, env_config=env_config, observation_space=obs_space, action_space=act_space)
        .env_runners(
            num_env_runners=res.num_env_runners,
            num_envs_per_env_runner=res.num_envs_per_env_runner,
            num_cpus_per_env_runner=res.num_cpus_per_env_runner,
            num_gpus_per_env_runner=res.num_gpus_per_env_runner,
            rollout_fragment_length=fragment,
            sample_timeout_s=None,
        )
        .learners(num_learners=0, num_gpus_per_learner=res.num_gpus_per_learner)
        .rl_module(model_config=model)
        .callbacks(CandidateCallback, **init)
        .fault_tolerance(restart_failed_env_runners=res.max_env_runner_restarts > 0,
                         max_num_env_runner_restarts=res.max_env_runner_restarts,
                         num_consecutive_env_runner_failures_tolerance=max(res.max_env_runner_restarts, 1),
                         delay_between_env_runner_restarts_s=1.0)
        .reporting(min_time_s_per_iteration=0, metrics_num_episodes_for_smoothing=max(agent.episodes_per_iteration, 1))
        .debugging(seed=config.seed, log_level="WARN")
    )
