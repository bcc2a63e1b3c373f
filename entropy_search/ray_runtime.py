"""Ray for the search and the sweep, in one place: start or join, the resource bundles of a search, and
whether they fit (docs/design.md, "Ray").

A search is one driver process (the agent's learner, the baselines, fine-tuning) and
`resources.num_env_runners` env runners, each a Ray actor holding the problem. A Tune trial reserves
them as one placement group: the trial's own process first, then one bundle per env runner.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import ray

from .config import SearchConfig
from .errors import ConfigError
from .jsonio import write_json

log = logging.getLogger(__name__)

#: Where a driver that started a local Ray lists that Ray's processes (one file per driver, by its PID), so that a
#: later start can stop what a driver killed outright (SIGKILL) left running: Ray's dashboard and runtime-env
#: agents outlive their raylet for minutes.
RAY_RECORDS = Path(tempfile.gettempdir()) / f"entropy-search-ray-{os.getuid()}"


class _DropNoise(logging.Filter):
    """Drop RLlib/Tune notices that say nothing to a user of the search."""

    NOISE = ("You are running PPO on the new API stack", "You are running SAC on the new API stack",
             "Install gputil for GPU system monitoring")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


def quiet_ray_notices() -> None:
    """Silence RLlib's and Tune's notices that say nothing to a user (idempotent)."""
    for name in ("ray.rllib.algorithms.algorithm_config", "ray.tune.utils.util"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in target.filters):
            target.addFilter(_DropNoise())


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: the configured address, else `RAY_ADDRESS`, else None (a local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def start_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Join the cluster at `address` (or `RAY_ADDRESS`) or start a new local Ray with `num_cpus`/`num_gpus`
    (default: all); nothing when Ray already runs in this process. Returns whether this call started it."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING)
    joined = cluster_address(address)
    if joined:
        ray.init(address=joined, **kwargs)
    else:
        stopped = stop_leftovers()
        if stopped:
            log.warning("stopped %d Ray processes left by a search that was killed (PIDs %s)", len(stopped),
                        " ".join(map(str, stopped)))
        # "local" always starts a new instance, even where another Ray runs on this machine
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, **kwargs)
        _write_record()
    return True


def _record_path() -> Path:
    """This driver's record of the local Ray it started."""
    return RAY_RECORDS / f"{os.getpid()}.json"


def _identity(proc: psutil.Process) -> list[float]:
    """A process as (PID, start time): a PID that was reused later is another process."""
    return [proc.pid, proc.create_time()]


def _same_process(identity: Sequence[float]) -> psutil.Process | None:
    """The running process with this identity, or None (gone, a zombie, or its PID reused)."""
    try:
        proc = psutil.Process(int(identity[0]))
        if abs(proc.create_time() - float(identity[1])) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except (psutil.Error, IndexError, TypeError, ValueError):
        pass
    return None


def remember_ray_processes() -> None:
    """Update this driver's record of the local Ray it started with the Ray processes running now (called once the
    agent's env runners run); nothing when it started none (it joined a cluster, or Ray was already running)."""
    if ray.is_initialized() and _record_path().exists():
        _write_record()


def _write_record() -> None:
    """This driver's record under `RAY_RECORDS`: itself and its local Ray's processes (raylet, GCS, agents,
    workers), each by PID and start time."""
    processes = []
    for proc in _ray_processes():
        try:
            processes.append(_identity(proc))
        except psutil.Error:
            continue
    RAY_RECORDS.mkdir(parents=True, exist_ok=True)
    write_json(_record_path(), {"driver": _identity(psutil.Process()), "processes": processes})


def stop_leftovers() -> list[int]:
    """Stop the processes of every record under `RAY_RECORDS` whose driver no longer runs (killed before it could
    stop its Ray), and delete those records; returns the PIDs stopped. Only the processes a record lists, with the
    same start time, are touched: never one that merely reuses a PID."""
    stopped: list[int] = []
    for path in sorted(RAY_RECORDS.glob("*.json")) if RAY_RECORDS.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _same_process(record.get("driver") or []) is not None:
            continue  # its driver runs: its Ray is in use
        left = [proc for proc in map(_same_process, record.get("processes") or []) if proc is not None]
        for proc in left:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _kill_unless_gone(left)
        stopped.extend(proc.pid for proc in left)
        path.unlink(missing_ok=True)
    return stopped


#: Seconds `stop_ray` waits for Ray's processes to exit by themselves before it kills them.
RAY_EXIT_GRACE_SECONDS = 10.0


def _ray_processes() -> list[psutil.Process]:
    """This process's descendants that belong to Ray (raylet, GCS, agents, workers): what a local Ray started."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            name, cmdline = proc.name(), " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if name.startswith("ray::") or name in ("raylet", "gcs_server") or "/ray/" in cmdline:
            found.append(proc)
    return found


def stop_ray() -> None:
    """Shut down the Ray this process started and wait until none of its processes is left: those still alive
    after `RAY_EXIT_GRACE_SECONDS` (an agent or a worker slow to notice) are killed, so nothing of ours lives on
    after the command returns (docs/design.md, "Ray")."""
    processes = _ray_processes()
    ray.shutdown()
    _kill_unless_gone(processes)
    _record_path().unlink(missing_ok=True)


def _kill_unless_gone(processes: list[psutil.Process]) -> None:
    """Wait up to `RAY_EXIT_GRACE_SECONDS` for `processes` to exit, then kill those still running."""
    _, alive = psutil.wait_procs(processes, timeout=RAY_EXIT_GRACE_SECONDS)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def env_runner_bundles(config: SearchConfig) -> list[dict[str, float]]:
    """One resource bundle per env runner of a search (none when its runners need no resources)."""
    res = config.resources
    runner: dict[str, float] = {}
    if res.num_cpus_per_env_runner:
        runner["CPU"] = float(res.num_cpus_per_env_runner)
    if res.num_gpus_per_env_runner:
        runner["GPU"] = float(res.num_gpus_per_env_runner)
    return [dict(runner) for _ in range(res.num_env_runners)] if runner else []


def search_bundles(config: SearchConfig, *, cpus: float = 1.0, gpus: float = 0.0) -> list[dict[str, float]]:
    """The placement group of a search run as a Tune trial: its own process (`cpus`, `gpus`), then its env runners."""
    head = {"CPU": float(cpus)}
    if gpus:
        head["GPU"] = float(gpus)
    return [head] + env_runner_bundles(config)


def check_fits(bundles: Sequence[dict[str, float]], what: str, hints: dict[str, str]) -> None:
    """ConfigError when `bundles` together need more CPUs or GPUs than the running Ray has: they would
    wait forever instead. `hints`: what to lower, per resource ("CPU", "GPU")."""
    total = ray.cluster_resources()
    for res in ("CPU", "GPU"):
        need = sum(b.get(res, 0.0) for b in bundles)
        have = total.get(res, 0.0)
        if need > have + 1e-9:
            raise ConfigError(f"resources: {need:g} {res}s wanted by {what}, the Ray cluster has {have:g}; "
                              f"{hints[res]}")
