"""Gymnasium environments of entropy-search (importable as `entropy_search.envs`)."""

from __future__ import annotations

import gymnasium as gym

from .pruning_env import (
    ENV_DEFAULTS,
    OBS_DIM,
    OBS_NAMES,
    Budget,
    PruningContext,
    PruningEnv,
    build_context,
    get_context,
    make_context,
    process_stats,
    share_cache,
)

ENV_ID = "EntropySearch/Pruning-v0"

if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point="entropy_search.envs.pruning_env:make_env")

__all__ = [
    "ENV_DEFAULTS",
    "ENV_ID",
    "OBS_DIM",
    "OBS_NAMES",
    "Budget",
    "PruningContext",
    "PruningEnv",
    "build_context",
    "get_context",
    "make_context",
    "process_stats",
    "share_cache",
]
