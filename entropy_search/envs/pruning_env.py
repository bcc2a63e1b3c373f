"""The Gymnasium environment of the search: one episode = one candidate network, one step = one residual block or
one channel group.

A thin adapter over `entropy_search.problem` (docs/design.md, "The environment"). An episode first decides the
space's residual blocks, one step each (the block's embedding, `type_block` set; an action below 0 drops it,
`Budget.block_step`), then the channel groups: at each step the agent sees group t's [0,1]-normalised embedding
(AMC's layer embedding) and answers one float in [-1, 1], which the budget of the blocks kept
(`Budget.given`) maps to a keep ratio and clips so that the episode stays on budget (a group inside a dropped
block stays whole: its action changes nothing). At the last step the candidate is evaluated through the
problem's cache and `info` carries every measurement.

The problem (network, groups, evaluation batches, cache) is built once per process (a Ray env runner)
by `get_problem` and shared by the environments living there. The environment builds itself from a
plain dict, `env_config(config)`: the resolved search config and an optional warm-cache file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from ..config import SearchConfig, config_from_dict
from ..problem import Budget, Problem, setup

LAYER_TYPES = ("conv", "depthwise", "linear")
OBS_NAMES = (
    "index", "type_conv", "type_depthwise", "type_linear", "in_channels", "out_channels", "kernel",
    "stride", "feature_size", "flops_share", "flops_removed", "flops_rest", "prev_action", "type_block",
)
OBS_DIM = len(OBS_NAMES)

def env_config(config: SearchConfig, warm_cache: str | os.PathLike | None = None) -> dict[str, Any]:
    """The plain dict an environment is built from (inside each Ray worker): the resolved config."""
    return {"config": config.to_dict(), "warm_cache": str(warm_cache) if warm_cache else None}


# every problem built in this process, by the hash of what defines it (shared by the envs of an env runner)
_PROBLEMS: dict[str, Problem] = {}


def problem_key(config: SearchConfig) -> str:
    """What makes two configs the same problem: network, data, search settings, seed (and the checkpoint file)."""
    data = config.to_dict()
    relevant = {k: data[k] for k in ("model", "data", "search", "seed")}
    path = config.checkpoint_path()
    if path.exists():  # a checkpoint rewritten at the same path is another network
        stat = os.stat(path)
        relevant["checkpoint_stat"] = (stat.st_mtime_ns, stat.st_size)
    return hashlib.sha1(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


def get_problem(env_cfg: dict) -> Problem:
    """The problem of this env config in this process, built on first use (warm cache loaded then)."""
    config = config_from_dict(env_cfg["config"])
    key = problem_key(config)
    problem = _PROBLEMS.get(key)
    if problem is None:
        if config.resources.torch_threads:
            torch.set_num_threads(config.resources.torch_threads)
        problem = setup(config)
        read_warm_cache(problem, env_cfg.get("warm_cache"))
        _PROBLEMS[key] = problem
    return problem


# how far this process has read each warm-cache file, by (path, inode): the driver replaces the file when a search
# starts or resumes, and appends to it after every iteration
_WARM_READ: dict[tuple[str, int], int] = {}


def read_warm_cache(problem: Problem, path: str | None) -> int:
    """Add to the problem's cache the candidates appended to the warm-cache file since this process last read it
    (whole lines only: a batch being written is read once it is complete); returns how many were new. Every
    episode starts with it, so an env runner RLlib restarted, which the driver's pushes (`share_cache`) may miss
    while it is not yet counted healthy, still knows everything evaluated before the iteration."""
    if not path:
        return 0
    try:
        with open(path, "rb") as fh:
            key = (path, os.fstat(fh.fileno()).st_ino)
            fh.seek(_WARM_READ.get(key, 0))
            data = fh.read()
    except FileNotFoundError:  # on another node than the driver: `share_cache` alone
        return 0
    whole = data.rfind(b"\n") + 1
    _WARM_READ[key] = _WARM_READ.get(key, 0) + whole
    return problem.cache.add([json.loads(line) for line in data[:whole].splitlines() if line.strip()])


def share_cache(records: Sequence[dict]) -> int:
    """Add candidates to every problem of this process (called on each env runner by the driver)."""
    return sum(problem.cache.add(records) for problem in _PROBLEMS.values())


def process_stats() -> dict[str, float]:
    """Evaluation counters of this process's problems (for benchmarks)."""
    out: dict[str, float] = {"evaluations": 0, "cache_hits": 0, "eval_seconds": 0.0, "pid": os.getpid()}
    for problem in _PROBLEMS.values():
        for k in ("evaluations", "cache_hits", "eval_seconds"):
            out[k] += problem.cache.stats[k]
    return out


def static_features(budget: Budget) -> np.ndarray:
    """Per-step features that do not depend on the episode: [n_blocks + n_groups, OBS_DIM] (the residual blocks'
    rows first, as an episode decides them), dynamic slots 0."""
    groups, blocks = budget.groups, budget.space.blocks
    group_rows = _group_features(budget)
    rows = np.zeros((len(blocks), OBS_DIM), dtype=np.float64)
    widest = max((g.in_channels for g in groups), default=1) or 1
    largest = max((g.feature_size for g in groups), default=1) or 1
    for b, block in enumerate(blocks):
        rows[b, 4] = rows[b, 5] = block.shape[0] / widest
        rows[b, 8] = (block.shape[1] if len(block.shape) > 1 else 1) / largest
        rows[b, 9] = block.macs / max(budget.base_macs, 1)
        rows[b, 13] = 1.0
    obs = np.concatenate([rows, group_rows])
    obs[:, 0] = np.arange(len(obs)) / max(len(obs) - 1, 1)
    return np.clip(obs, 0.0, 1.0)


def _group_features(budget: Budget) -> np.ndarray:
    groups = budget.groups
    n = len(groups)
    obs = np.zeros((n, OBS_DIM), dtype=np.float64)

    def norm(values):
        values = np.asarray(values, dtype=np.float64)
        top = values.max() if len(values) else 1.0
        return values / top if top > 0 else values

    obs[:, 0] = np.arange(n) / max(n - 1, 1)
    for i, g in enumerate(groups):
        obs[i, 1 + LAYER_TYPES.index(g.layer_type if g.layer_type in LAYER_TYPES else "conv")] = 1.0
    obs[:, 4] = norm([g.in_channels for g in groups])
    obs[:, 5] = norm([g.out_channels for g in groups])
    obs[:, 6] = norm([g.kernel for g in groups])
    obs[:, 7] = norm([g.stride for g in groups])
    obs[:, 8] = norm([g.feature_size for g in groups])
    obs[:, 9] = np.asarray([g.macs for g in groups], dtype=np.float64) / max(budget.base_macs, 1)
    return np.clip(obs, 0.0, 1.0)


# ---------------------------------------------------------------- the environment


class PruningEnv(gym.Env):
    """Gymnasium environment of the channel-pruning search (see the module docstring).

    `config` is the plain dict of `env_config(...)` (or an RLlib EnvContext of it); tests and benchmarks
    may pass a prebuilt `problem` instead.
    """

    metadata = {"render_modes": []}

    def __init__(self, config: dict | None = None, *, problem: Problem | None = None) -> None:
        super().__init__()
        if problem is None and not (config and "config" in config):
            raise ValueError("PruningEnv needs env_config(config) or a problem")
        self.problem = problem if problem is not None else get_problem(dict(config))
        self._warm_cache = (config or {}).get("warm_cache")
        self.space = self.problem.space
        self.budget = self.problem.budget
        self.static_obs = static_features(self.budget)
        self.n_blocks = len(self.space.blocks)
        self.n_groups = self.budget.n
        self.n_steps = self.n_blocks + self.n_groups
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(OBS_DIM,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        shares = self.static_obs[self.n_blocks:, 9]
        after = np.concatenate([np.cumsum(shares[::-1])[::-1][1:], [0.0]])  # FLOPs share of the groups after g
        self._rest_share = np.concatenate([np.full(self.n_blocks, shares.sum()), after])
        self._t = 0
        self._dropped: set[int] = set()
        self._episode_budget = self.budget
        self._counts: list[int] = []
        self._desired: list[float] = []
        self._actions: list[float] = []
        self._prev = 0.0
        self.episodes = 0

    # -- gymnasium API

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        read_warm_cache(self.problem, self._warm_cache)
        self._t = 0
        self._dropped = set()
        self._episode_budget = self.budget
        self._counts = []
        self._desired = []
        self._actions = []
        self._prev = 0.0
        return self._obs(), {"block": 0} if self.n_blocks else {"group": 0}

    def step(self, action):
        if self._t >= self.n_steps:
            raise RuntimeError("step() called after the episode ended; call reset()")
        a = float(np.asarray(action, dtype=np.float64).reshape(-1)[0])
        self._actions.append(a)
        if self._t < self.n_blocks:
            b = self._t
            drop, clipped = self.budget.block_step(self._dropped, b, a)
            if drop:
                self._dropped.add(b)
            self._prev = 0.0 if drop else 1.0
            self._t += 1
            if self._t == self.n_blocks:
                self._episode_budget = self.budget.given(self._dropped)
            return self._obs(), 0.0, False, False, {"block": b, "dropped": drop, "clipped": clipped}
        g = self._t - self.n_blocks
        count, desired_keep, clipped = self._episode_budget.step(self._counts, a)
        self._counts.append(count)
        self._desired.append(desired_keep)
        self._prev = count / self.budget.groups[g].channels
        self._t += 1
        if self._t < self.n_steps:
            return self._obs(), 0.0, False, False, {"group": g, "keep": self._prev, "clipped": clipped}
        record, hit = self.problem.evaluate(self._counts, dropped=self._dropped)
        self.episodes += 1
        info = dict(record)
        info.update(
            cache_hit=hit,
            actions=list(self._actions),
            desired_keep=list(self._desired),
            worker=os.getpid(),
        )
        if not self._episode_budget.within(self._counts):  # by construction; a bug if it fires
            raise AssertionError(f"budget violated: {self._episode_budget.cost(self._counts)} > {self.budget.target}")
        return self._obs(), float(record["reward"]), True, False, info

    # -- helpers

    def _obs(self) -> np.ndarray:
        t = min(self._t, self.n_steps - 1)
        obs = self.static_obs[t].copy()
        base = max(self.budget.base_macs, 1)
        if self._counts:
            counts = list(self._counts) + self.budget.full_counts[len(self._counts):]
            obs[10] = (base - self._episode_budget.macs(counts)) / base
        elif self._dropped:  # deciding blocks: every group still at full width
            obs[10] = (base - self.space.macs_of_counts(self.budget.full_counts, frozenset(self._dropped))) / base
        obs[11] = self._rest_share[t] if self._t < self.n_steps else 0.0
        obs[12] = self._prev
        if self._t >= self.n_steps:
            obs[0] = 1.0
        return np.clip(obs, 0.0, 1.0).astype(np.float32)

    def candidate(self) -> dict:
        """The decided channel counts so far (for debugging)."""
        return {"kept_channels": list(self._counts), "dropped_blocks": sorted(self._dropped), "step": self._t}


def make_env(config: dict | None = None) -> PruningEnv:
    """Factory for `gymnasium.make`-style and RLlib registration."""
    return PruningEnv(config)
