"""The Gymnasium environment of entropy-search, a thin adapter over `entropy_search.problem`."""

from __future__ import annotations

import gymnasium as gym

from .pruning_env import OBS_DIM, OBS_NAMES, PruningEnv, env_config, get_problem, process_stats, share_cache

ENV_ID = "EntropySearch/Pruning-v0"

if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point="entropy_search.envs.pruning_env:make_env")

__all__ = ["ENV_ID", "OBS_DIM", "OBS_NAMES", "PruningEnv", "env_config", "get_problem", "process_stats", "share_cache"]
