"""The driver of a search: the agent's training loop, candidate collection, checkpoints and resume
(docs/design.md, "The search loop"). No baselines, no fine-tuning: `entropy_search.search` does those."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import SearchConfig
from ..envs import env_config, share_cache
from ..jsonio import JsonlAppender, plain, read_jsonl, write_json, write_jsonl
from ..problem import cache_entry, record_key
from ..ray_runtime import quiet_ray_notices
from ..utils import seed_everything
from .algorithm import (
    CANDIDATES_KEY,
    adaptive_learner_state,
    build_algorithm_config,
    restore_adaptive_learner_state,
)
from .rundir import AGENT_DIR, CACHE_FILE, CANDIDATES_FILE, CHECKPOINT_DIR, STATE_FILE, WARM_CACHE_FILE

log = logging.getLogger(__name__)

#: Keys of a candidate record written first in candidates.jsonl (the rest follow in the order they come).
RECORD_KEYS_FIRST = ("id", "iteration", "reward", "macs_ratio", "params_ratio", "blocks_kept", "entropy", "accuracy",
                     "kept_channels", "keep", "dropped_blocks")


def ordered_row(record: dict) -> dict:
    """A candidate record as a row of candidates.jsonl: `RECORD_KEYS_FIRST` first, the rest as they come."""
    row = {k: record[k] for k in RECORD_KEYS_FIRST if k in record}
    row.update({k: v for k, v in record.items() if k not in row})
    return row


@dataclass
class SearchState:
    """What the driver knows about a search; checkpointed with the agent."""

    iteration: int = 0
    episodes: int = 0
    evaluations: int = 0
    cache_hits: int = 0
    eval_seconds: float = 0.0
    wall_seconds: float = 0.0
    env_runner_restarts: int = 0
    env_runners_lost: int = 0
    top_k_size: int = 3
    cache: dict[tuple, dict] = field(default_factory=dict)  # by `record_key`
    top_k: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    pending: set[tuple] = field(default_factory=set)  # cached after the last checkpoint, not yet counted

    def add(self, record: dict) -> bool:
        """Count a candidate (an episode); returns whether it was a new evaluation."""
        self.episodes += 1
        key = record_key(record)
        new = key not in self.cache and not record.get("cache_hit", False)
        if record.get("cache_hit") and key not in self.pending:  # a pending one was evaluated before a resume
            self.cache_hits += 1
        else:
            self.evaluations += 1
            self.eval_seconds += float(record.get("eval_seconds") or 0.0)
        if key not in self.cache:
            self.cache[key] = cache_entry(record)
            self.update_top_k(self.cache[key])
        elif key in self.pending:  # evaluated after the checkpoint a resume started from: counted now
            self.pending.discard(key)
            self.update_top_k(self.cache[key])
        return new

    def update_top_k(self, entry: dict) -> None:
        """Enter a candidate into the top-k by reward."""
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
            "env_runner_restarts": self.env_runner_restarts, "env_runners_lost": self.env_runners_lost,
            "top_k": self.top_k, "history": self.history,
        }


def stop_reason(config: SearchConfig, state: SearchState) -> str | None:
    """Why the search stops now (the first stop rule met), or None."""
    stop = config.stop
    if stop.iterations is not None and state.iteration >= stop.iterations:
        return f"{state.iteration} iterations"
    if stop.candidates is not None and state.episodes >= stop.candidates:
        return f"{state.episodes} candidates"
    if stop.wall_seconds is not None and state.wall_seconds >= stop.wall_seconds:
        return f"{state.wall_seconds:.0f} s"
    if stop.patience is not None and len(state.history) > stop.patience:
        best = [row.get("best_reward", float("nan")) for row in state.history]
        if not best[-1] > best[-1 - stop.patience]:  # the best reward is the running maximum: no rise at all
            return f"no better reward in {stop.patience} iterations"
    return None


class RLSearch:
    """The agent's training loop with candidate collection, checkpoints and resume (no baselines, no fine-tune).

    Usable on its own (the benchmark does): `RLSearch(config, n_steps).run()` returns the SearchState.
    """

    def __init__(
        self,
        config: SearchConfig,
        n_steps: int,
        *,
        resume: bool = False,
        progress: bool = True,
        on_iteration: Callable[[dict], None] | None = None,
    ) -> None:
        self.config = config
        self.n_steps = n_steps
        self.out = Path(config.output.dir)
        self.ckpt_dir = self.out / CHECKPOINT_DIR
        self.candidates_path = self.out / CANDIDATES_FILE
        self.resume = resume
        self.progress = progress
        self.on_iteration = on_iteration
        self.state = SearchState(top_k_size=config.search.top_k)
        self.algo = None
        self._fh = None
        self._next_id = 0  # ids of candidates.jsonl rows stay unique across resumes
        self._restarts_before = 0  # env runner restarts of the runs before a resume
        self._workers: set[int] = set()  # processes that evaluated this run's candidates
        self._healthy = config.resources.num_env_runners  # healthy env runners after the last iteration
        self._agent: Path | None = None  # the agent folder of the last committed checkpoint
        self._learner_extra: dict = {}  # learner state RLlib's checkpoint leaves out (state.json's `learner`)
        self._warm: JsonlAppender | None = None  # the env runners' warm cache, appended to as the search goes
        self._unreplayed: dict[tuple, dict] = {}  # rows a resume cut, by candidate, until the replay writes them
        self._replay_until = 0  # the last iteration of the run a resume continues: its replay ends there

    # -- resume

    def _load_previous(self) -> bool:
        """Load the checkpointed state and cache; True when an agent checkpoint exists.

        Exactly once (docs/design.md, "Run directory and resume"): the agent resumes from its checkpoint and
        replays the iterations after it, so candidates.jsonl is cut back to the checkpoint's iterations (an
        atomic rewrite, which also drops a row torn by a kill or a full disk) and the replay writes those rows
        again, once. What was evaluated after the checkpoint is not lost: it stays in the cache, so a replayed
        candidate is not evaluated twice, and enters the top-k when the replay records it. A candidate the replay
        does not propose again (a fresh agent, without an agent checkpoint; env runners whose episodes arrive in
        another order) is written back once the replay has passed the killed run's last iteration
        (`_record_unreplayed`): everything evaluated stays in candidates.jsonl, once."""
        state_path = self.ckpt_dir / STATE_FILE
        saved = json.loads(state_path.read_text()) if state_path.exists() else {}
        agent = self._agent_dir(saved)
        has_agent = agent is not None
        cut = int(saved.get("iteration", 0)) if has_agent else 0
        records = read_jsonl(self.ckpt_dir / CACHE_FILE)
        committed = int(saved.get("cache_size", len(records))) if has_agent else len(records)
        written = read_jsonl(self.candidates_path)
        kept = [r for r in written if int(r.get("iteration", 0)) <= cut]
        later = [r for r in written if int(r.get("iteration", 0)) > cut]
        if written or self.candidates_path.exists():
            write_jsonl(self.candidates_path, kept)
        self._unreplayed = {record_key(r): r for r in later if not r.get("cache_hit")}
        self._replay_until = max((int(r.get("iteration", 0)) for r in later), default=cut)
        self._next_id = max((int(r.get("id", -1)) for r in written), default=-1) + 1
        for rec in records[:committed]:
            key = record_key(rec)
            if key not in self.state.cache:
                self.state.cache[key] = cache_entry(rec)
                self.state.update_top_k(self.state.cache[key])
        # evaluated after the checkpoint: cached, not counted (the replay counts it)
        for rec in [*records[committed:], *later]:
            key = record_key(rec)
            if key not in self.state.cache:
                self.state.cache[key] = cache_entry(rec)
                self.state.pending.add(key)
        if has_agent:
            for name in ("iteration", "episodes", "evaluations", "cache_hits", "eval_seconds", "wall_seconds",
                         "env_runner_restarts", "env_runners_lost"):
                setattr(self.state, name, type(getattr(self.state, name))(saved.get(name, 0)))
            self.state.history = list(saved.get("history", []))
            self._agent = agent
            self._learner_extra = dict(saved.get("learner", {}))
        return has_agent

    def _agent_dir(self, saved: dict) -> Path | None:
        """The agent folder the committed checkpoint names (`agent` for checkpoints from before names), or None."""
        if not saved:
            return None
        agent = self.ckpt_dir / saved.get("agent", AGENT_DIR)
        return agent if agent.is_dir() else None

    def _warm_cache_file(self) -> Path | None:
        """The candidates an env runner starts from: the cache so far, appended to as the search goes (`_share`),
        so that a runner RLlib restarts after its process died starts from everything evaluated before it."""
        if not self.config.search.cache or self.config.resources.num_env_runners == 0:
            return None
        path = write_jsonl(self.ckpt_dir / WARM_CACHE_FILE, self.state.cache.values())
        self._warm = JsonlAppender(path)
        return path

    # -- main loop

    def build(self) -> None:
        has_agent = False
        if self.resume:
            has_agent = self._load_previous()
            self._restarts_before = self.state.env_runner_restarts
            if not has_agent:
                log.warning("no agent checkpoint in %s: starting the agent afresh (evaluated candidates are kept)", self.ckpt_dir)
        algo_config = build_algorithm_config(self.config, self.n_steps, env_config(self.config, self._warm_cache_file()))
        quiet_ray_notices()
        self.algo = algo_config.build_algo()
        if has_agent:
            self.algo.restore_from_path(str(self._agent.resolve()))
            restore_adaptive_learner_state(self.algo, self._learner_extra)

    def run(self) -> SearchState:
        if self.algo is None:
            self.build()
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.resume and self.candidates_path.exists():
            self.candidates_path.unlink()
        self._fh = JsonlAppender(self.candidates_path)
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
            while stop_reason(self.config, state) is None:
                t_iter = time.perf_counter()
                self._seed_iteration(state.iteration + 1)
                result = self.algo.train()
                state.iteration += 1
                records = result.get("env_runners", {}).get(CANDIDATES_KEY, [])
                if not isinstance(records, list):
                    records = []
                new = self._ingest(records)
                self._share(new)
                if state.pending and state.iteration >= self._replay_until:
                    self._record_unreplayed()
                state.wall_seconds = time.perf_counter() - start
                # env runner processes that took over from one that died (RLlib restarts them): measured from
                # the records, each of which names the process that evaluated it
                runners = self.config.resources.num_env_runners
                state.env_runner_restarts = self._restarts_before + (max(0, len(self._workers) - runners) if runners else 0)
                healthy = (result.get("fault_tolerance") or {}).get("num_healthy_workers", runners)
                if healthy < self._healthy:  # runners RLlib took out of service: their process died
                    state.env_runners_lost += self._healthy - healthy
                self._healthy = healthy
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
            if state.pending:  # stopped before the replay passed the killed run's last iteration
                self._record_unreplayed()
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
                if state.iteration != last_ckpt or self._agent is None:
                    self.save_checkpoint()
            for appender in (self._fh, self._warm):
                if appender is not None:
                    appender.close()
            self._fh = self._warm = None
        return state

    def _seed_iteration(self, iteration: int) -> None:
        """Seed the learner and every env runner from (seed, iteration), and have each runner start the iteration
        with fresh episodes, so that an iteration depends only on what a checkpoint holds: a resumed search then
        repeats the uninterrupted one's iterations (exactly so without remote env runners, whose results arrive
        in no fixed order). Episodes end at iteration boundaries (the rollout fragment is whole episodes), so the
        reset loses nothing."""
        seed = int(np.random.SeedSequence([self.config.seed, iteration]).generate_state(1)[0])
        seed_everything(seed)

        def reseed(runner) -> None:
            seed_everything(seed + runner.worker_index)
            runner._needs_initial_reset = True  # RLlib's flag for "reset the envs at the next sample"

        self.algo.env_runner_group.foreach_env_runner(reseed, local_env_runner=True)

    def stop(self) -> None:
        if self._warm is not None:  # built, never run
            self._warm.close()
            self._warm = None
        if self.algo is not None:
            try:
                self.algo.stop()
            finally:
                self.algo = None

    # -- helpers

    def _ingest(self, records: list[dict]) -> list[dict]:
        new, rows = [], []
        for rec in records:
            rec = plain(dict(rec))
            rec["id"] = self._next_id
            self._next_id += 1
            rec["iteration"] = self.state.iteration
            rec["time"] = round(time.time(), 3)
            if rec.get("worker") is not None:
                self._workers.add(rec["worker"])
            if rec.get("cache_hit") and record_key(rec) in self.state.pending:
                # evaluated before the resume, not here: this row records that evaluation, once
                rec.update(cache_hit=False, evaluated_before_resume=True)
            if self.state.add(rec):
                new.append(self.state.cache[record_key(rec)])
            rows.append(ordered_row(rec))
        self._fh.write(rows)  # whole rows, one write: a kill or a full disk cannot tear one
        return new

    def _record_unreplayed(self) -> None:
        """Write the candidates a resumed search's replay did not propose again (still `pending`) as rows marked
        `unreplayed` and `evaluated_before_resume`, with their first row's id and iteration, and count them: they
        were evaluated."""
        state, rows = self.state, []
        for key in sorted(state.pending, key=lambda k: int(self._unreplayed.get(k, {}).get("id", self._next_id))):
            row = {**state.cache[key], **self._unreplayed.get(key, {}), "unreplayed": True,
                   "evaluated_before_resume": True}
            if "id" not in row:  # known only from the cache (a resume of a resume)
                row.update(id=self._next_id, iteration=state.iteration)
                self._next_id += 1
            state.episodes += 1
            state.evaluations += 1
            state.eval_seconds += float(row.get("eval_seconds") or 0.0)
            state.update_top_k(state.cache[key])
            rows.append(ordered_row(row))
        state.pending.clear()
        self._unreplayed.clear()
        self._fh.write(rows)

    def _share(self, new: list[dict]) -> None:
        """Give every env runner the candidates evaluated elsewhere (one cache for the whole search), and the warm
        cache a restarted runner starts from."""
        if not new or self._warm is None:
            return
        payload = [cache_entry(r) for r in new]
        self._warm.write(payload)
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
            "env_runner_restarts": state.env_runner_restarts,
            "env_runners_lost": state.env_runners_lost,
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
        """Agent (RLlib checkpoint), candidate cache and state; `state.json` commits it (docs/design.md, "Run
        directory and resume").

        The agent is saved to `agent-<iteration>.tmp`, renamed, then `cache.jsonl` and `state.json` (naming the
        agent folder and how many cache entries it covers) are each written to a temporary file and renamed. A
        kill or a full disk at any point leaves the previous checkpoint as it was; the folders it no longer needs
        are deleted after the commit."""
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        agent = self.ckpt_dir / f"{AGENT_DIR}-{self.state.iteration:06d}"
        if agent != self._agent:  # the agent changes only with iterations: same iteration, same agent
            tmp = agent.with_name(agent.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(agent, ignore_errors=True)  # an uncommitted leftover
            try:
                self.algo.save_to_path(str(tmp.resolve()))
                os.replace(tmp, agent)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # a failed save frees its space
        cache = self.state.cache
        counted = [entry for key, entry in cache.items() if key not in self.state.pending]
        write_jsonl(self.ckpt_dir / CACHE_FILE, counted + [cache[key] for key in self.state.pending])
        write_json(self.ckpt_dir / STATE_FILE, {**self.state.to_json(), "agent": agent.name,
                                                "cache_size": len(counted), "learner": adaptive_learner_state(self.algo)})
        self._agent = agent
        for old in self.ckpt_dir.glob(f"{AGENT_DIR}*"):
            if old != agent and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        return self.ckpt_dir
