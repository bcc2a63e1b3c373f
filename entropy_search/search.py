"""One RL pruning search (`entropy-search search CONFIG.yaml`), distributed over Ray env runners.

`run_search(config)`:

1. loads (or trains) the baseline checkpoint, builds the pruning space on the driver and checks that
   the FLOPs target is reachable (a ConfigError before anything starts);
2. builds an RLlib algorithm on the new API stack (PPO by default, SAC as an option) whose
   `num_env_runners` workers each hold a `PruningEnv` (network, groups, evaluation batches built once
   per worker); candidates are evaluated where the environments live;
3. trains until the stop rule (iterations, candidates, wall seconds). Every evaluated candidate
   reaches the driver through the episode-end callback (RLlib's metrics logger), is appended to
   `candidates.jsonl` as it comes, enters the candidate cache (shared back to every worker) and the
   top-k; the agent, the cache and the top-k are checkpointed every `output.checkpoint_every`
   iterations; `resume=True` continues from there;
4. runs the baselines under the same budget and number of candidate evaluations (uniform, random);
5. prunes the top-k (and the baselines' best) for real, fine-tunes and tests them, exports the best,
   and writes `result.json`.

`on_iteration(metrics)` is called after every training iteration with a flat dict of numbers (the
Tune sweep logs them to MLflow).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import SearchConfig, load_config
from .errors import CheckpointError, ConfigError, EntropySearchError

log = logging.getLogger(__name__)

CANDIDATES_KEY = "candidates"
RESULT_FILE = "result.json"
CANDIDATES_FILE = "candidates.jsonl"
CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
CACHE_FILE = "cache.jsonl"
AGENT_DIR = "agent"

#: Driver-side keys of a candidate record (the rest comes from the environment).
_RECORD_KEYS_FIRST = ("id", "iteration", "reward", "macs_ratio", "params_ratio", "entropy", "accuracy", "kept_channels", "keep")


# ---------------------------------------------------------------- RLlib pieces


def _candidate_callback_class():
    from ray.rllib.callbacks.callbacks import RLlibCallback

    class CandidateCallback(RLlibCallback):
        """Report every finished episode's candidate (the terminal step's info) to the driver."""

        def on_episode_end(self, *, episode, metrics_logger=None, **kwargs) -> None:
            info = episode.get_infos(-1)
            if metrics_logger is not None and isinstance(info, dict) and "kept_channels" in info:
                metrics_logger.log_value(CANDIDATES_KEY, info, reduce="item_series")

    return CandidateCallback


CandidateCallback = _candidate_callback_class()


def build_algorithm_config(config: SearchConfig, n_groups: int, env_config: dict | None = None):
    """The RLlib AlgorithmConfig of a search (new API stack). `n_groups` = steps per episode."""
    import gymnasium as gym
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    from entropy_search.envs import OBS_DIM, PruningEnv

    agent, res = config.agent, config.resources
    env_config = dict(env_config if env_config is not None else config.env_config())
    runners = max(res.num_env_runners, 1) * res.num_envs_per_env_runner
    episodes_per_runner = max(1, math.ceil(agent.episodes_per_iteration / runners))
    fragment = episodes_per_runner * n_groups
    batch = fragment * runners
    obs_space = gym.spaces.Box(0.0, 1.0, shape=(OBS_DIM,), dtype=np.float32)
    act_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

    if agent.algorithm == "ppo":
        from ray.rllib.algorithms.ppo import PPOConfig

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
        from ray.rllib.algorithms.sac import SACConfig

        training: dict[str, Any] = dict(
            gamma=agent.gamma,
            actor_lr=agent.actor_lr,
            critic_lr=agent.critic_lr,
            alpha_lr=agent.alpha_lr,
            tau=agent.tau,
            initial_alpha=agent.initial_alpha,
            train_batch_size_per_learner=agent.train_batch_size,
            num_steps_sampled_before_learning_starts=agent.learning_starts_episodes * n_groups,
            replay_buffer_config={"type": "PrioritizedEpisodeReplayBuffer", "capacity": agent.replay_capacity,
                                  "alpha": 0.6, "beta": 0.4},
        )
        if agent.training_intensity is not None:
            training["training_intensity"] = agent.training_intensity
        algo = SACConfig().training(**training).reporting(min_sample_timesteps_per_iteration=batch)
        model = DefaultModelConfig(fcnet_hiddens=list(agent.hidden_sizes), fcnet_activation=agent.activation)

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
        .callbacks(CandidateCallback)
        .fault_tolerance(restart_failed_env_runners=False)
        .reporting(min_time_s_per_iteration=0, metrics_num_episodes_for_smoothing=max(agent.episodes_per_iteration, 1))
        .debugging(seed=config.seed, log_level="WARN")
    )


def trial_resources(config: SearchConfig) -> list[dict[str, float]]:
    """Resource bundles of one search: the driver (and its learner), then one per env runner. A Tune
    trial that runs `run_search` reserves these (`tune.PlacementGroupFactory(trial_resources(config))`)."""
    res = config.resources
    driver = {"CPU": 1.0}
    if res.num_gpus_per_learner:
        driver["GPU"] = res.num_gpus_per_learner
    runner = {"CPU": res.num_cpus_per_env_runner}
    if res.num_gpus_per_env_runner:
        runner["GPU"] = res.num_gpus_per_env_runner
    return [driver] + [dict(runner) for _ in range(res.num_env_runners)]


class _DropNoise(logging.Filter):
    """Drop RLlib/Tune notices that say nothing to a user of the search."""

    NOISE = ("You are running PPO on the new API stack", "You are running SAC on the new API stack",
             "Install gputil for GPU system monitoring")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


def _quiet_ray_notices() -> None:
    for name in ("ray.rllib.algorithms.algorithm_config", "ray.tune.utils.util"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in target.filters):
            target.addFilter(_DropNoise())


def ensure_ray(config: SearchConfig) -> bool:
    """Start (or join) Ray unless it runs already; returns whether this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = config.resources.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING, configure_logging=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=config.resources.num_cpus, **kwargs)
    return True


def check_ray_resources(config: SearchConfig) -> None:
    """Env runners that can never be placed would hang the search: say so instead."""
    import ray

    res = config.resources
    total = ray.cluster_resources()
    need_cpu = res.num_env_runners * res.num_cpus_per_env_runner
    need_gpu = res.num_env_runners * res.num_gpus_per_env_runner
    if need_cpu > total.get("CPU", 0) + 1e-9:
        raise ConfigError(
            f"resources: {res.num_env_runners} env runners x {res.num_cpus_per_env_runner:g} CPUs need {need_cpu:g} CPUs, "
            f"the Ray cluster has {total.get('CPU', 0):g}; lower resources.num_env_runners or num_cpus_per_env_runner"
        )
    if need_gpu > total.get("GPU", 0) + 1e-9:
        raise ConfigError(
            f"resources.num_gpus_per_env_runner: {res.num_env_runners} env runners x {res.num_gpus_per_env_runner:g} GPUs "
            f"need {need_gpu:g} GPUs, the Ray cluster has {total.get('GPU', 0):g}"
        )


# ---------------------------------------------------------------- driver-side bookkeeping


@dataclass
class SearchState:
    """What the driver knows about a search; checkpointed with the agent."""

    iteration: int = 0
    episodes: int = 0
    evaluations: int = 0
    cache_hits: int = 0
    eval_seconds: float = 0.0
    wall_seconds: float = 0.0
    top_k_size: int = 3
    cache: dict[tuple[int, ...], dict] = field(default_factory=dict)
    top_k: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)

    def add(self, record: dict) -> bool:
        """Count a candidate (an episode); returns whether it was a new evaluation."""
        self.episodes += 1
        key = tuple(int(c) for c in record["kept_channels"])
        new = key not in self.cache and not record.get("cache_hit", False)
        if record.get("cache_hit"):
            self.cache_hits += 1
        else:
            self.evaluations += 1
            self.eval_seconds += float(record.get("eval_seconds") or 0.0)
        if key not in self.cache:
            self.cache[key] = _cache_entry(record)
            self._update_top_k(self.cache[key])
        return new

    def _update_top_k(self, entry: dict) -> None:
        if entry.get("reward") is None:
            return
        self.top_k.append(entry)
        self.top_k.sort(key=lambda r: -float(r["reward"]))
        del self.top_k[self.top_k_size:]

    @property
    def best(self) -> dict | None:
        return self.top_k[0] if self.top_k else None

    def to_json(self) -> dict:
        return {
            "iteration": self.iteration, "episodes": self.episodes, "evaluations": self.evaluations,
            "cache_hits": self.cache_hits, "eval_seconds": self.eval_seconds, "wall_seconds": self.wall_seconds,
            "top_k": self.top_k, "history": self.history,
        }


def _plain(value):
    """numpy scalars/arrays (RLlib numpy-izes episode infos) to plain Python, recursively."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _cache_entry(record: dict) -> dict:
    drop = {"cache_hit", "actions", "desired_keep", "worker"}
    return {k: v for k, v in record.items() if k not in drop}


def _stop_reason(config: SearchConfig, state: SearchState) -> str | None:
    stop = config.stop
    if stop.iterations is not None and state.iteration >= stop.iterations:
        return f"{state.iteration} iterations"
    if stop.candidates is not None and state.episodes >= stop.candidates:
        return f"{state.episodes} candidates"
    if stop.wall_seconds is not None and state.wall_seconds >= stop.wall_seconds:
        return f"{state.wall_seconds:.0f} s"
    return None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _read_jsonl(path: Path) -> list[dict]:
    from entropy_search.envs.pruning_env import read_jsonl

    return read_jsonl(path) if path.exists() else []


# ---------------------------------------------------------------- the RL loop


class RLSearch:
    """The agent's training loop with candidate collection, checkpoints and resume (no baselines, no fine-tune).

    Usable on its own (the benchmark does): `RLSearch(config, n_groups).run()` returns the SearchState.
    """

    def __init__(
        self,
        config: SearchConfig,
        n_groups: int,
        *,
        resume: bool = False,
        progress: bool = True,
        on_iteration: Callable[[dict], None] | None = None,
        env_config: dict | None = None,
    ) -> None:
        self.config = config
        self.n_groups = n_groups
        self.out = Path(config.output.dir)
        self.ckpt_dir = self.out / CHECKPOINT_DIR
        self.candidates_path = self.out / CANDIDATES_FILE
        self.resume = resume
        self.progress = progress
        self.on_iteration = on_iteration
        self.env_config = dict(env_config if env_config is not None else config.env_config())
        self.state = SearchState(top_k_size=config.search.top_k)
        self.algo = None
        self._fh = None
        self._next_id = 0  # ids of candidates.jsonl rows stay unique across resumes

    # -- resume

    def _load_previous(self) -> bool:
        """Load the checkpointed state and every candidate written so far; True when an agent checkpoint exists."""
        state_path = self.ckpt_dir / STATE_FILE
        has_agent = (self.ckpt_dir / AGENT_DIR).exists() and state_path.exists()
        saved = json.loads(state_path.read_text()) if state_path.exists() else {}
        records = _read_jsonl(self.ckpt_dir / CACHE_FILE)
        seen = {tuple(r["kept_channels"]) for r in records}
        # candidates evaluated after the last checkpoint were written too: keep them (no re-evaluation)
        written = _read_jsonl(self.candidates_path)
        self._next_id = max((int(r.get("id", -1)) for r in written), default=-1) + 1
        extra = [r for r in written if tuple(r["kept_channels"]) not in seen]
        for rec in records + extra:
            key = tuple(int(c) for c in rec["kept_channels"])
            if key not in self.state.cache:
                self.state.cache[key] = _cache_entry(rec)
                self.state._update_top_k(self.state.cache[key])
        if has_agent:
            for name in ("iteration", "episodes", "evaluations", "cache_hits", "eval_seconds", "wall_seconds"):
                setattr(self.state, name, type(getattr(self.state, name))(saved.get(name, 0)))
            self.state.history = list(saved.get("history", []))
        return has_agent

    def _warm_cache_file(self) -> Path | None:
        if not self.state.cache or not self.config.search.cache:
            return None
        path = self.ckpt_dir / "warm_cache.jsonl"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as fh:
            for rec in self.state.cache.values():
                fh.write(json.dumps(rec, default=_json_default) + "\n")
        return path

    # -- main loop

    def build(self) -> None:
        has_agent = False
        if self.resume:
            has_agent = self._load_previous()
            if not has_agent:
                log.warning("no agent checkpoint in %s: starting the agent afresh (evaluated candidates are kept)", self.ckpt_dir)
        env_config = dict(self.env_config)
        warm = self._warm_cache_file()
        if warm is not None:
            env_config["warm_cache"] = str(warm)
        algo_config = build_algorithm_config(self.config, self.n_groups, env_config)
        _quiet_ray_notices()
        self.algo = algo_config.build_algo()
        if has_agent:
            self.algo.restore_from_path(str((self.ckpt_dir / AGENT_DIR).resolve()))

    def run(self) -> SearchState:
        import torch
        from tqdm.auto import tqdm

        if self.algo is None:
            self.build()
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.resume and self.candidates_path.exists():
            self.candidates_path.unlink()
        self._fh = open(self.candidates_path, "a")
        state = self.state
        # the agent's networks are tiny: one thread avoids oversubscribing the cores the env runners use
        # (with 2+ threads on a busy machine a PPO update was measured 30x slower)
        threads = torch.get_num_threads()
        if self.config.resources.torch_threads:
            torch.set_num_threads(self.config.resources.torch_threads)
        total = self.config.stop.iterations
        bar = tqdm(total=total, initial=min(state.iteration, total or state.iteration), desc="search",
                   unit="it", disable=not self.progress, dynamic_ncols=True)
        start = time.perf_counter() - state.wall_seconds
        last_ckpt = state.iteration
        completed = False
        try:
            while _stop_reason(self.config, state) is None:
                t_iter = time.perf_counter()
                result = self.algo.train()
                state.iteration += 1
                records = result.get("env_runners", {}).get(CANDIDATES_KEY, [])
                if not isinstance(records, list):
                    records = []
                new = self._ingest(records)
                self._share(new)
                state.wall_seconds = time.perf_counter() - start
                metrics = self._metrics(result, records, time.perf_counter() - t_iter)
                state.history.append(metrics)
                bar.update(1)
                best = state.best
                bar.set_postfix(
                    best=f"{best['reward']:.4f}" if best else "-",
                    flops=f"{best['macs_ratio']:.3f}" if best else "-",
                    cand_s=f"{metrics['candidates_per_second']:.1f}",
                )
                if self.on_iteration is not None:
                    self.on_iteration(dict(metrics))
                if state.iteration - last_ckpt >= self.config.output.checkpoint_every:
                    self.save_checkpoint()
                    last_ckpt = state.iteration
            completed = True
        except KeyboardInterrupt:
            # an orderly interrupt checkpoints what it has; a crash or a kill resumes from the last checkpoint
            state.wall_seconds = time.perf_counter() - start
            try:
                self.save_checkpoint()
            except Exception as exc:  # the interrupt wins; the previous checkpoint is intact
                log.warning("could not checkpoint on interrupt: %s", exc)
            raise
        finally:
            torch.set_num_threads(threads)
            bar.close()
            if completed:
                state.wall_seconds = time.perf_counter() - start
                if state.iteration != last_ckpt or not (self.ckpt_dir / AGENT_DIR).exists():
                    self.save_checkpoint()
            if self._fh is not None:
                self._fh.close()
                self._fh = None
        return state

    def stop(self) -> None:
        if self.algo is not None:
            try:
                self.algo.stop()
            finally:
                self.algo = None

    # -- helpers

    def _ingest(self, records: list[dict]) -> list[dict]:
        new = []
        for rec in records:
            rec = _plain(dict(rec))
            rec["id"] = self._next_id
            self._next_id += 1
            rec["iteration"] = self.state.iteration
            rec["time"] = round(time.time(), 3)
            if self.state.add(rec):
                new.append(self.state.cache[tuple(int(c) for c in rec["kept_channels"])])
            ordered = {k: rec[k] for k in _RECORD_KEYS_FIRST if k in rec}
            ordered.update({k: v for k, v in rec.items() if k not in ordered})
            self._fh.write(json.dumps(ordered, default=_json_default) + "\n")
        self._fh.flush()
        return new

    def _share(self, new: list[dict]) -> None:
        """Give every env runner the candidates evaluated elsewhere (one cache for the whole search)."""
        if not new or not self.config.search.cache or self.config.resources.num_env_runners == 0:
            return
        from entropy_search.envs.pruning_env import share_cache

        payload = [_cache_entry(r) for r in new]
        self.algo.env_runner_group.foreach_env_runner(lambda _runner: share_cache(payload), local_env_runner=False)

    def _metrics(self, result: dict, records: list[dict], seconds: float) -> dict:
        state = self.state
        rewards = [float(r["reward"]) for r in records if r.get("reward") is not None]
        evaluated = [r for r in records if not r.get("cache_hit")]
        best = state.best or {}
        wall = max(state.wall_seconds, 1e-9)
        timers = result.get("timers") or {}
        return {
            "iteration": state.iteration,
            "candidates": state.episodes,
            "evaluations": state.evaluations,
            "cache_hits": state.cache_hits,
            "iteration_candidates": len(records),
            "iteration_evaluations": len(evaluated),
            "reward_mean": float(np.mean(rewards)) if rewards else float("nan"),
            "reward_max": float(np.max(rewards)) if rewards else float("nan"),
            "best_reward": best.get("reward", float("nan")),
            "best_macs_ratio": best.get("macs_ratio", float("nan")),
            "best_params_ratio": best.get("params_ratio", float("nan")),
            "best_entropy": best.get("entropy", float("nan")),
            "best_accuracy": best.get("accuracy") if best.get("accuracy") is not None else float("nan"),
            "candidates_per_second": state.episodes / wall,
            "evaluations_per_second": state.evaluations / wall,
            "iteration_seconds": seconds,
            "sampling_seconds": float(timers.get("env_runner_sampling_timer", float("nan"))),
            "learner_seconds": float(timers.get("learner_update_timer", float("nan"))),
            "wall_seconds": state.wall_seconds,
            "eval_seconds": state.eval_seconds,
        }

    def save_checkpoint(self) -> Path:
        """Agent (RLlib checkpoint), candidate cache and top-k, written atomically (tmp dir then rename)."""
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        agent_dir = self.ckpt_dir / AGENT_DIR
        tmp = self.ckpt_dir / (AGENT_DIR + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        self.algo.save_to_path(str(tmp.resolve()))
        cache_tmp = self.ckpt_dir / (CACHE_FILE + ".tmp")
        with open(cache_tmp, "w") as fh:
            for rec in self.state.cache.values():
                fh.write(json.dumps(rec, default=_json_default) + "\n")
        old = self.ckpt_dir / (AGENT_DIR + ".old")
        if old.exists():
            shutil.rmtree(old)
        if agent_dir.exists():
            os.replace(agent_dir, old)
        os.replace(tmp, agent_dir)
        os.replace(cache_tmp, self.ckpt_dir / CACHE_FILE)
        _write_json(self.ckpt_dir / STATE_FILE, self.state.to_json())
        if old.exists():
            shutil.rmtree(old)
        return self.ckpt_dir


# ---------------------------------------------------------------- driver-side setup and final steps


@dataclass
class Prepared:
    """What the driver builds once: the network, its space and budget, the data and an evaluator."""

    model: Any
    splits: Any
    space: Any
    budget: Any
    evaluator: Any
    env_config: dict


def ensure_checkpoint(config: SearchConfig, *, progress: bool = True) -> Path:
    """The baseline checkpoint; trained on the train split first when missing and allowed."""
    path = config.checkpoint_path()
    if path.exists():
        return path
    if not config.model.train_if_missing:
        raise CheckpointError(
            f"model.checkpoint: {path} does not exist; train one with `entropy-search train` or set model.train_if_missing: true"
        )
    from .checkpoint import save_checkpoint
    from .data import load_data
    from .models import create_model
    from .train import evaluate, train
    from .utils import seed_everything

    splits = load_data(config.data.name, config.data.root, seed=config.seed)
    seed_everything(config.seed)  # the initial weights too: the same config gives the same baseline
    model = create_model(config.model.name, num_classes=splits.num_classes, in_channels=splits.in_channels)
    print(f"no checkpoint at {path}: training a baseline {config.model.name} on {splits.name} "
          f"for {config.model.train_epochs} epochs")
    history = train(model, splits.train, epochs=config.model.train_epochs, seed=config.seed, progress=progress,
                    desc=f"baseline {config.model.name}")
    metrics = {"test_acc": evaluate(model, splits.test), "epochs": config.model.train_epochs}
    if history:
        metrics.update(train_loss=history[-1]["loss"], train_acc=history[-1]["acc"])
    save_checkpoint(
        path, model, model_name=config.model.name, num_classes=splits.num_classes, in_channels=splits.in_channels,
        image_size=splits.image_size, data=splits.name,
        config={"seed": config.seed, "heldout_fraction": 0.1, "epochs": config.model.train_epochs, "trained_by": "search"},
        metrics=metrics,
    )
    return path


def prepare(config: SearchConfig, *, progress: bool = True) -> Prepared:
    """Checkpoint, data, pruning space, budget check and a local evaluator (driver side, before Ray)."""
    from entropy_search.envs.pruning_env import Budget, load_pruning_setup, make_evaluator

    from .space import PruningSpace

    ensure_checkpoint(config, progress=progress)
    env_config = config.env_config()
    model, splits, example = load_pruning_setup(env_config)
    space = PruningSpace(model, example, round_to=config.search.round_to)
    budget = Budget(space, config.search.flops_target, config.search.min_keep, config.search.flops_floor)
    budget.check()
    evaluator = make_evaluator(model, space, splits, env_config)
    return Prepared(model, splits, space, budget, evaluator, env_config)


def _local_evaluate(prep: Prepared, reward: str, cache: dict) -> Callable[[Any], dict]:
    """Evaluate a candidate (channel counts) on the driver, through the same cache as the search."""
    from entropy_search.envs.pruning_env import _jsonable

    from .rewards import compute_reward

    def evaluate(counts) -> dict:
        key = tuple(int(c) for c in counts)
        if key in cache:
            return dict(cache[key])
        keep = prep.space.counts_to_keep(key)
        record = _jsonable(dict(prep.evaluator.evaluate(keep)))
        record["reward"] = float(compute_reward(reward, record))
        record["kept_channels"] = list(key)
        record["keep"] = [float(k) for k in keep]
        cache[key] = record
        return dict(record)

    return evaluate


def _policy(space, record: dict) -> dict:
    return {g.name: round(float(k), 6) for g, k in zip(space.groups, record["keep"])}


def finalize_candidate(prep: Prepared, config: SearchConfig, record: dict, *, label: str, progress: bool):
    """Prune for real, check the MACs, re-estimate BN statistics as the search did, test before and after
    fine-tuning."""
    from .adaptive_bn import recalibrate_batchnorm
    from .flops import count_macs, count_params
    from .train import evaluate, fine_tune

    keep = record["keep"]
    pruned = prep.space.prune(keep)
    macs = count_macs(pruned, prep.space.example_input)
    params = count_params(pruned)
    if prep.evaluator.calibration is not None:  # the very images the search re-estimated BN on
        recalibrate_batchnorm(pruned, prep.evaluator.calibration)
    before = evaluate(pruned, prep.splits.test)
    t0 = time.perf_counter()
    history = []
    if config.finetune.epochs > 0:
        history = fine_tune(pruned, prep.splits.train, epochs=config.finetune.epochs, lr=config.finetune.lr,
                            batch_size=config.finetune.batch_size, seed=config.seed, progress=progress,
                            desc=f"fine-tune {label}")
    after = evaluate(pruned, prep.splits.test)
    out = {
        "label": label,
        "policy": _policy(prep.space, record),
        "keep": keep,
        "kept_channels": record["kept_channels"],
        "reward": record.get("reward"),
        "entropy": record.get("entropy"),
        "heldout_accuracy": record.get("accuracy"),
        "macs": macs,
        "params": params,
        "macs_ratio": macs / prep.space.base_macs,
        "params_ratio": params / prep.space.base_params,
        "analytic_macs_match": macs == record.get("macs"),
        "test_accuracy_before_finetune": before,
        "test_accuracy_after_finetune": after,
        "finetune_seconds": time.perf_counter() - t0,
        "finetune_history": history,
    }
    return out, pruned


def _export(pruned, example, out_dir: Path, name: str, onnx: bool) -> dict:
    import torch

    files = {}
    path = out_dir / f"{name}.pt"
    torch.save(pruned, path)
    files["pytorch"] = str(path)
    if onnx:
        try:
            onnx_path = out_dir / f"{name}.onnx"
            torch.onnx.export(pruned.eval(), example, str(onnx_path), input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
            files["onnx"] = str(onnx_path)
        except Exception as exc:  # export is a convenience; the PyTorch file is the result
            log.warning("ONNX export failed: %s", exc)
            files["onnx_error"] = str(exc)
    return files


def _check_output_dir(config: SearchConfig, resume: bool, overwrite: bool) -> None:
    out = Path(config.output.dir)
    ckpt = out / CHECKPOINT_DIR
    if resume:
        saved = out / CONFIG_FILE
        if saved.exists():
            import yaml

            before = yaml.safe_load(saved.read_text()) or {}
            now = config.to_dict()
            for section in ("model", "data", "search"):
                if before.get(section) != now.get(section):
                    diff = _first_difference(before.get(section), now.get(section), section)
                    raise ConfigError(f"--resume: {diff} changed since the interrupted run; use another output.dir")
            if (before.get("agent") or {}).get("algorithm") != now["agent"]["algorithm"]:
                raise ConfigError("--resume: agent.algorithm changed since the interrupted run; use another output.dir")
        return
    if (ckpt.exists() or (out / CANDIDATES_FILE).exists()) and not overwrite:
        raise ConfigError(
            f"output.dir {out} holds a previous search; pass --resume to continue it, --overwrite to start over, "
            "or choose another output.dir"
        )
    if overwrite:
        for name in (CHECKPOINT_DIR,):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (CANDIDATES_FILE, RESULT_FILE):
            (out / name).unlink(missing_ok=True)


def _first_difference(a, b, prefix: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}.{key}")
    return f"{prefix} ({a!r} -> {b!r})"


def run_search(
    config: SearchConfig | dict | str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_iteration: Callable[[dict], None] | None = None,
) -> dict:
    """Run one search end to end and return the result dict (also written to `<output.dir>/result.json`)."""
    from .utils import seed_everything

    config = config if isinstance(config, SearchConfig) else load_config(config)
    t_start = time.perf_counter()
    out = Path(config.output.dir)
    _check_output_dir(config, resume, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)

    prep = prepare(config, progress=progress)  # config errors (unreachable target...) before Ray starts
    config.save(out / CONFIG_FILE)

    t_setup = time.perf_counter()
    started_ray = ensure_ray(config)
    search = None
    try:
        check_ray_resources(config)
        search = RLSearch(config, len(prep.space.groups), resume=resume, progress=progress,
                          on_iteration=on_iteration, env_config=prep.env_config)
        try:
            search.build()
            setup_seconds = time.perf_counter() - t_setup
            state = search.run()
        except Exception as exc:
            raise _user_error(exc, search) from exc
    finally:
        if search is not None:
            search.stop()
        if started_ray:
            import ray

            ray.shutdown()
    return finish_search(config, prep, state, progress=progress, setup_seconds=setup_seconds, t_start=t_start)


def finish_search(
    config: SearchConfig,
    prep: Prepared,
    state: SearchState,
    *,
    progress: bool = True,
    setup_seconds: float = 0.0,
    t_start: float | None = None,
) -> dict:
    """After the agent: baselines under the same budget and evaluations, the top-k (and the baselines' best)
    pruned for real, fine-tuned and tested, the best exported, `result.json` written. No Ray."""
    from .rewards import proxy_agreement
    from .utils import environment_info

    t_start = time.perf_counter() if t_start is None else t_start
    out = Path(config.output.dir)
    search_seconds = state.wall_seconds
    if config.resources.driver_threads:
        import torch

        torch.set_num_threads(config.resources.driver_threads)
    if state.best is None:
        raise EntropySearchError("the search evaluated no candidate; raise stop.iterations or stop.candidates")

    # ---- baselines under the same budget and number of evaluations
    t_base = time.perf_counter()
    cache: dict = {}
    evaluate = _local_evaluate(prep, config.search.reward, cache)
    baselines: dict[str, Any] = {}
    if config.baselines.enabled:
        from .baselines import random_search, uniform_baseline

        baselines["uniform"] = uniform_baseline(prep.budget, evaluate)
        n_random = config.baselines.random_candidates or max(state.evaluations, 1)
        baselines["random"] = random_search(prep.budget, evaluate, n_random, seed=config.seed + 1)
    baselines_seconds = time.perf_counter() - t_base

    # ---- the best candidates, pruned for real, fine-tuned, tested
    from .flops import count_macs, count_params
    from .train import evaluate as test_accuracy

    full = prep.evaluator.evaluate([1.0] * len(prep.space.groups))
    prep.model.to("cpu")  # pruning traces the graph with the (CPU) example input; training moves models back
    base = {
        "macs": int(prep.space.base_macs),
        "params": int(prep.space.base_params),
        "counted_macs": count_macs(prep.model, prep.space.example_input),
        "counted_params": count_params(prep.model),
        "test_accuracy": test_accuracy(prep.model, prep.splits.test),
        "heldout_accuracy": full.get("accuracy"),
        "entropy": full.get("entropy"),
    }
    prep.model.to("cpu")
    t_ft = time.perf_counter()
    top_k, best_model = [], None
    for rank, record in enumerate(state.top_k):
        final, pruned = finalize_candidate(prep, config, record, label=f"top{rank + 1}", progress=progress)
        final["rank"] = rank + 1
        top_k.append(final)
        if rank == 0:
            best_model = pruned
    if config.baselines.enabled and config.baselines.finetune:
        for name, res in baselines.items():
            if res.get("best") is not None:
                res["final"], _ = finalize_candidate(prep, config, res["best"], label=name, progress=progress)
    finetune_seconds = time.perf_counter() - t_ft
    files = {"candidates": str(out / CANDIDATES_FILE), "config": str(out / CONFIG_FILE),
             "checkpoint": str(out / CHECKPOINT_DIR)}
    if best_model is not None:
        files.update(_export(best_model, prep.space.example_input, out, "best_pruned", config.output.export_onnx))

    best = top_k[0] if top_k else None
    result = {
        "config": config.to_dict(),
        "environment": environment_info(),
        "groups": [
            {"index": g.index, "name": g.name, "layer_type": g.layer_type, "channels": g.channels, "macs": g.macs}
            for g in prep.space.groups
        ],
        "base": base,
        "best_policy": best["policy"] if best else None,
        "best": best,
        "top_k": top_k,
        "baselines": baselines,
        "comparison": _comparison(best, baselines),
        # does the reward rank the candidates as held-out accuracy does? (every candidate the agent evaluated)
        "proxy": proxy_agreement(list(state.cache.values())),
        "cost": {
            "iterations": state.iteration,
            "candidates": state.episodes,
            "evaluations": state.evaluations,
            "cache_hits": state.cache_hits,
            "setup_seconds": setup_seconds,
            "search_seconds": search_seconds,
            "candidates_per_second": state.episodes / max(search_seconds, 1e-9),
            "evaluations_per_second": state.evaluations / max(search_seconds, 1e-9),
            "eval_seconds": state.eval_seconds,
            # the env runners' time not spent evaluating candidates (sampling, agent, sync, collection)
            "rl_overhead": max(0.0, 1.0 - state.eval_seconds / (max(config.resources.num_env_runners, 1) * max(search_seconds, 1e-9))),
            "baselines_seconds": baselines_seconds,
            "finetune_seconds": finetune_seconds,
            "total_seconds": time.perf_counter() - t_start,
            "num_env_runners": config.resources.num_env_runners,
        },
        "history": state.history,
        "files": files,
    }
    _write_json(out / RESULT_FILE, result)
    return result


def _user_error(exc: Exception, search: RLSearch | None) -> Exception:
    """Ray failures (a worker killed for memory, an env error inside a worker) as one-line user errors that
    say how to continue; anything else unchanged."""
    try:
        import ray.exceptions as rex
    except ImportError:  # pragma: no cover
        return exc
    if not isinstance(exc, rex.RayError):
        return exc
    cause = getattr(exc, "cause", None)
    if isinstance(cause, EntropySearchError):
        return cause
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    reason = next((ln for ln in lines if "memory" in ln.lower()), lines[0] if lines else type(exc).__name__)
    done = search.state.iteration if search is not None else 0
    where = f" in {search.out}" if search is not None else ""
    return EntropySearchError(
        f"the search stopped after iteration {done}: an env runner failed ({reason[:300]}); the last checkpoint"
        f"{where} is kept: continue with --resume"
    )


def _comparison(best: dict | None, baselines: dict) -> dict:
    """Agent vs baselines in one place: reward, FLOPs, test accuracy after fine-tuning."""
    rows = {}
    if best:
        rows["agent"] = {k: best.get(k) for k in ("reward", "macs_ratio", "heldout_accuracy", "test_accuracy_after_finetune")}
    for name, res in baselines.items():
        rec, final = res.get("best") or {}, res.get("final") or {}
        rows[name] = {
            "reward": rec.get("reward"),
            "macs_ratio": rec.get("macs_ratio"),
            "heldout_accuracy": rec.get("accuracy"),
            "test_accuracy_after_finetune": final.get("test_accuracy_after_finetune"),
        }
    return rows
