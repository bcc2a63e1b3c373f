"""Running a sweep with Ray Tune (`entropy-search sweep tune_configs/<name>.yaml`) and reading it back
from MLflow (`entropy-search report`) (docs/design.md, "Sweeps").

`run_sweep`:

1. joins the Ray cluster (`resources.address`, else ``RAY_ADDRESS``) or starts Ray locally;
2. trains each missing baseline checkpoint once, in a Ray task with a trial's resources (not once per
   trial), and checks that every FLOPs target is reachable and that the sweep fits on its disk before any
   trial starts (the disk before Ray starts when the baselines exist);
3. opens (or, with ``resume``, finds again) the sweep's MLflow parent run;
4. runs one Tune trial per point of the axes (`entropy_search.sweep.trainable.run_trial`): each trial
   is one RL search through `entropy_search.search.run_search`, in its own folder
   ``<storage_path>/<name>/<trial>/search``, in a placement group holding the trial's own process and
   one bundle per env runner, tracked in its MLflow child run;
5. closes runs left open (crashed trials: FAILED; an interrupted sweep: KILLED) and logs the
   summary table and comparison plot on the parent run.

``resume=True`` continues an interrupted sweep with `tune.Tuner.restore`: finished trials are not run
again and keep their MLflow runs, unfinished ones are restarted and continue their search from its
last checkpoint, logging into the run they had.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from .. import tracking
from ..config import SearchConfig, load_config
from ..errors import ConfigError, EntropySearchError
from ..plots import sweep_comparison
from ..problem import PruningSpace, ensure_checkpoint, load_network
from ..problem.setup import build_budget
from ..ray_runtime import check_fits, cluster_address, start_ray, stop_ray
from ..rl.rundir import space_needed
from ..store import check_reachable, resolve_tracking_uri
from ..summary import aggregate_rows, flatten, format_aggregate, format_table
from .schema import (
    MAX_VALIDATED,
    SweepConfig,
    load_sweep_config,
    trial_bundles,
    trial_config,
    trial_resources,
)
from .trainable import materialize_baselines, run_trial, status_callback, trial_name

log = logging.getLogger(__name__)


def _scheduler(sweep: SweepConfig, base: SearchConfig):
    s = sweep.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    max_t = s.max_t or base.stop.iterations or 100
    return ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=min(s.grace_period, max_t),
                         reduction_factor=s.reduction_factor)


def _check_fits(sweep: SweepConfig, points: list[dict]) -> None:
    """On a local Ray, a trial needing more than the machine has would wait forever: say so."""
    for params in points[:MAX_VALIDATED] or [{}]:
        check_fits(trial_bundles(sweep, params), "one trial (its own share + env runners x theirs)",
                   {"CPU": "lower resources.cpus_per_trial, num_env_runners or cpus_per_env_runner",
                    "GPU": "lower resources.gpus_per_trial, num_env_runners or gpus_per_env_runner"})


def _train_baselines(sweep: SweepConfig, configs: list[SearchConfig]) -> dict[str, bytes]:
    """Each distinct baseline checkpoint, trained once in a Ray task if missing; returns {path: bytes}."""
    wanted: dict[str, SearchConfig] = {}
    for cfg in configs:
        wanted.setdefault(str(cfg.checkpoint_path()), cfg)
    missing = {p: c for p, c in wanted.items() if not Path(p).exists()}
    for path, cfg in missing.items():
        if not cfg.model.train_if_missing:
            raise ConfigError(f"model.checkpoint: {path} does not exist; train one with `entropy-search train` "
                              "or set model.train_if_missing: true")
    blobs: dict[str, bytes] = {}
    if missing:
        bundles = trial_bundles(sweep, {})
        cpus = sweep.resources.baseline_cpus or sum(b.get("CPU", 0.0) for b in bundles) or 1.0
        gpus = sweep.resources.baseline_gpus
        if gpus is None:
            gpus = 1.0 if any(b.get("GPU") for b in bundles) else 0.0
        task = ray.remote(_train_baseline_task).options(num_cpus=cpus, num_gpus=gpus)
        refs = {path: task.remote(cfg.to_dict(), int(max(1, math.floor(cpus)))) for path, cfg in missing.items()}
        print(f"sweep {sweep.name}: training {len(refs)} baseline checkpoint(s) first: {', '.join(refs)}", flush=True)
        for path, ref in refs.items():
            blobs[path] = ray.get(ref)
        materialize_baselines(blobs)
    for path in wanted:
        if path not in blobs:
            blobs[path] = Path(path).read_bytes()
    return blobs


def _train_baseline_task(config: dict, threads: int) -> bytes:
    torch.set_num_threads(threads)
    cfg = load_config(config, resolve_paths=False)
    return Path(ensure_checkpoint(cfg, progress=False)).read_bytes()


def _spaces(configs: list[SearchConfig], spaces: dict[tuple, PruningSpace]) -> list[PruningSpace]:
    """The pruning space of each config's baseline, built once per (checkpoint, round_to) into `spaces`."""
    out = []
    for cfg in configs:
        key = (str(cfg.checkpoint_path()), cfg.search.round_to)
        if key not in spaces:
            network = load_network(cfg)
            spaces[key] = PruningSpace(network.model, network.example_input, round_to=cfg.search.round_to)
        out.append(spaces[key])
    return out


def _check_budgets(configs: list[SearchConfig], spaces: dict[tuple, PruningSpace]) -> None:
    """Every (network, target, min_keep, rounding) is reachable: a ConfigError before trials start (a latency
    budget's table is measured here, once, and cached for the trials)."""
    seen: set[tuple] = set()
    for cfg, space in zip(configs, _spaces(configs, spaces)):
        s = cfg.search
        combo = (str(cfg.checkpoint_path()), s.round_to, s.flops_target, s.min_keep, s.flops_floor, s.budget,
                 s.latency_target, s.latency_target_ms, s.latency_batch, s.latency_statistic)
        if combo in seen:
            continue
        seen.add(combo)
        build_budget(space, cfg)


def _check_free_space(sweep: SweepConfig, configs: list[SearchConfig], spaces: dict[tuple, PruningSpace]) -> None:
    """The whole sweep fits on the disk of its folder: every trial's need (`space_needed` of the largest trial,
    times the trials) against the free space; one line before any trial starts, else a full disk would stop
    trials one by one. (A resumed sweep is not checked as a whole: its finished trials need nothing more, and
    each trial still checks its own need.)"""
    need = sweep.num_trials() * max(space_needed(cfg, len(space.groups))
                                    for cfg, space in zip(configs, _spaces(configs, spaces)))
    folder = next(p for p in (sweep.sweep_dir, *sweep.sweep_dir.parents) if p.exists())
    free = shutil.disk_usage(folder).free
    if free < need:
        raise EntropySearchError(
            f"no space left on {sweep.sweep_dir}: {math.ceil(need / 2**20)} MB needed for {sweep.num_trials()} "
            f"trial(s), {free / 2**20:.1f} MB free; free some space or choose another storage_path")


def _sweep_params(sweep: SweepConfig) -> dict[str, str]:
    params = flatten(sweep.model_dump(mode="json", exclude={"base", "axes", "mlflow"}), "sweep.")
    params.update(flatten(sweep.base, "base."))
    for key, axis in sweep.axes.items():
        params[f"axes.{key}"] = json.dumps({axis.kind: axis.values}, default=str)
    params["sweep.trials"] = str(sweep.num_trials())
    return params


def describe(sweep: SweepConfig) -> str:
    """What the sweep will run (`--dry-run`): the axes, the trials and their resources."""
    lines = [f"sweep {sweep.name}: {sweep.num_trials()} trial(s) in {sweep.sweep_dir}",
             f"  scheduler {sweep.scheduler.type}, at most {sweep.max_concurrent_trials or 'as many as fit'} at once"]
    for key, axis in sweep.axes.items():
        lines.append(f"  axis {key}: {axis.kind} {axis.values}")
    for i, params in enumerate(sweep.grid_points()[:50] or [{}]):
        cfg = trial_config(sweep, params)
        lines.append(f"  [{i}] {params or '(base)'}  bundles {trial_bundles(sweep, params)}  checkpoint "
                     f"{cfg.checkpoint_path()}")
    return "\n".join(lines)


def run_sweep(
    sweep: SweepConfig | str | os.PathLike | Mapping[str, Any],
    *,
    resume: bool = False,
    overwrite: bool = False,
    retry_failed: bool = False,
    verbose: int = 1,
) -> dict[str, Any]:
    """Run (or with `resume`, continue) a sweep; returns its summary (rows, table, MLflow ids, paths).

    `overwrite` deletes a previous sweep of the same name first (its MLflow runs stay); `retry_failed`
    (with `resume`) runs the trials that had failed again."""
    sweep = sweep if isinstance(sweep, SweepConfig) else load_sweep_config(sweep)
    t0 = time.perf_counter()
    sweep_dir = sweep.sweep_dir
    has_state = sweep_dir.exists() and tune.Tuner.can_restore(str(sweep_dir))
    if resume and not has_state:
        if sweep_dir.exists() and any(sweep_dir.iterdir()):
            log.warning("%s holds no Tune state to restore: starting the sweep afresh", sweep_dir)
        resume = False
    elif not resume and sweep_dir.exists() and any(sweep_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"{sweep_dir} holds a previous sweep {sweep.name!r}; pass --resume to continue it, "
                              "--overwrite to start over, or choose another name")
        shutil.rmtree(sweep_dir)

    points = sweep.grid_points()
    configs = [trial_config(sweep, p) for p in (points[:MAX_VALIDATED] or [{}])]
    base_config = configs[0]

    tracking_uri = resolve_tracking_uri(sweep.mlflow.tracking_uri)
    check_reachable(tracking_uri)
    res = sweep.resources
    spaces: dict[tuple, PruningSpace] = {}
    have_baselines = all(cfg.checkpoint_path().exists() for cfg in configs)
    if not resume and have_baselines:
        _check_free_space(sweep, configs, spaces)  # before Ray starts
    started = start_ray(res.address, num_cpus=res.num_cpus, num_gpus=res.num_gpus)
    try:
        if not cluster_address(res.address):
            _check_fits(sweep, points)
        baselines = _train_baselines(sweep, configs)
        if not resume and not have_baselines:
            _check_free_space(sweep, configs, spaces)  # the baselines it measures from exist now
        _check_budgets(configs, spaces)

        mlclient = tracking.client(tracking_uri)
        experiment_id = tracking.get_or_create_experiment(mlclient, sweep.experiment_name, tracking_uri)
        env_tags = tracking.environment_tags()
        parent_id, reused = tracking.open_sweep_run(
            mlclient, experiment_id, name=sweep.name, sweep_dir=str(sweep_dir), params=_sweep_params(sweep),
            tags={**env_tags, tracking.NOTE_TAG: sweep.description or f"sweep {sweep.name}",
                  tracking.AXES_TAG: json.dumps(list(sweep.axes))},
            resume=resume)
        if verbose:
            print(f"sweep {sweep.name}: {sweep.num_trials()} trial(s), MLflow experiment {sweep.experiment_name!r} "
                  f"run {parent_id}{' (resumed)' if reused else ''} at {tracking_uri}", flush=True)
        trial_tags = {k: v for k, v in env_tags.items() if not k.startswith("hardware")}
        context = {"sweep": sweep, "sweep_dir": str(sweep_dir), "tracking_uri": tracking_uri,
                   "experiment_id": experiment_id, "parent_run_id": parent_id, "tags": trial_tags,
                   "baselines": baselines}
        trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), trial_resources(sweep))

        interrupted = False
        if resume:
            tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=retry_failed)
        else:
            sweep_dir.parent.mkdir(parents=True, exist_ok=True)
            tuner = tune.Tuner(
                trainable,
                param_space=sweep.param_space(),
                tune_config=tune.TuneConfig(
                    num_samples=sweep.num_samples,
                    scheduler=_scheduler(sweep, base_config),
                    metric=sweep.scheduler.metric if sweep.scheduler.type != "fifo" else None,
                    mode=sweep.scheduler.mode if sweep.scheduler.type != "fifo" else None,
                    max_concurrent_trials=sweep.max_concurrent_trials,
                    trial_name_creator=trial_name,
                    trial_dirname_creator=trial_name,
                ),
                run_config=tune.RunConfig(
                    name=sweep.name,
                    storage_path=str(sweep_dir.parent),
                    failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                    callbacks=[status_callback(tracking_uri, experiment_id, parent_id)],
                    verbose=verbose,
                ),
            )
        crash: Exception | None = None
        try:
            results = tuner.fit()
            errors = len(results.errors)
            statuses = _trial_statuses(results)
            # Tune returns normally after Ctrl-C (it saves its state first); an interrupted trial may even
            # read TERMINATED then. What tells: runs still open (a finished trial closed its run, a crashed
            # one was closed by the callback), or trials never started.
            still_open = [r for r in tracking.trial_runs(mlclient, experiment_id, parent_id)
                          if r.info.status in ("RUNNING", "SCHEDULED")]
            interrupted = bool(still_open) or bool(statuses and len(statuses) < sweep.num_trials())
        except KeyboardInterrupt:
            interrupted, errors, statuses = True, 0, {}
        except Exception as exc:  # Tune itself stopped (e.g. its workers were killed for memory)
            crash, errors, statuses = exc, 0, {}
        if interrupted:
            tracking.close_unfinished_trials(mlclient, experiment_id, parent_id, "KILLED",
                                             "the sweep was interrupted; `entropy-search sweep ... --resume` continues it")
        else:
            note = (f"the sweep stopped ({_first_line(crash)}); --resume continues it" if crash
                    else "the trial's process ended without closing its run")
            tracking.close_unfinished_trials(mlclient, experiment_id, parent_id, "FAILED", note)
        rows, paths = tracking.log_sweep_summary(mlclient, experiment_id, parent_id, sweep_dir / "summary",
                                                 title=f"sweep {sweep.name}", description=sweep.description)
        failed = sum(r["status"] == "FAILED" for r in rows)
        status = "KILLED" if interrupted else ("FAILED" if failed and failed == len(rows) else "FINISHED")
        tracking.log_metrics(mlclient, parent_id, {"wall_seconds": time.perf_counter() - t0})
        if crash is not None:
            status = "FAILED"
        tracking.set_status(mlclient, parent_id, status, f"{failed} failed trial(s)" if failed else None)
        if crash is not None:
            raise EntropySearchError(f"Ray Tune stopped the sweep: {_first_line(crash)}; "
                                     f"`entropy-search sweep ... --resume` continues it") from crash
    finally:
        if started:
            stop_ray()
    return {
        "name": sweep.name, "sweep_dir": str(sweep_dir), "tracking_uri": tracking_uri,
        "experiment": sweep.experiment_name, "experiment_id": experiment_id, "parent_run_id": parent_id,
        "rows": rows, "table": format_table(rows), "summary": {k: str(v) for k, v in paths.items()},
        "errors": errors, "failed": failed, "interrupted": interrupted, "status": status, "trial_statuses": statuses,
        "wall_seconds": time.perf_counter() - t0,
    }


def _first_line(exc: BaseException | None) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300] if exc is not None else ""


def _trial_statuses(results) -> dict[str, str]:
    """{trial_id: Tune status} of a ResultGrid (empty if Tune's internals moved)."""
    try:
        return {t.trial_id: t.status for t in results._experiment_analysis.trials}
    except AttributeError:
        return {}


def report(sweep: str, *, tracking_uri: str | None = None, out: str | os.PathLike | None = None) -> dict[str, Any]:
    """The summary of a sweep from MLflow: `sweep` is its name, its folder, or its YAML file.

    Returns {rows, table, aggregate, plot, parent_run_id, ...}; writes the comparison plot to `out`
    (default: `<sweep dir>/summary/comparison.png` when that folder is here, else `./<name>-comparison.png`)."""
    name, sweep_dir = sweep, None
    path = Path(sweep)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        cfg = load_sweep_config(path)
        name, sweep_dir = cfg.name, str(cfg.sweep_dir)
        tracking_uri = tracking_uri or cfg.mlflow.tracking_uri
    elif path.is_dir():
        sweep_dir, name = str(path.resolve()), None
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise EntropySearchError(f"no MLflow store at {uri[len('sqlite:///'):]} (set --tracking-uri or MLFLOW_TRACKING_URI)")
    mlclient = tracking.client(uri)
    run = tracking.find_sweep_run(mlclient, sweep_dir=sweep_dir, name=name)
    if run is None and sweep_dir is not None:
        run = tracking.find_sweep_run(mlclient, name=Path(sweep_dir).name)
    if run is None:
        raise EntropySearchError(f"no sweep {sweep!r} in the MLflow store {uri} (set --tracking-uri or MLFLOW_TRACKING_URI)")
    experiment_id = run.info.experiment_id
    rows = tracking.sweep_rows(mlclient, experiment_id, run.info.run_id)
    run_name = run.data.tags.get(tracking.SWEEP_TAG, run.info.run_name)
    run_dir = run.data.tags.get(tracking.SWEEP_DIR_TAG)
    if out is None:
        out = (Path(run_dir) / "summary" / "comparison.png" if run_dir and Path(run_dir).is_dir()
               else Path.cwd() / f"{run_name}-comparison.png")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_comparison(rows, out, title=f"sweep {run_name}")
    agg = aggregate_rows(rows)
    return {
        "name": run_name, "sweep_dir": run_dir, "tracking_uri": uri, "experiment_id": experiment_id,
        "parent_run_id": run.info.run_id, "status": run.info.status, "rows": rows,
        "table": format_table(rows), "aggregate": agg,
        "aggregate_table": format_aggregate(agg) if any(a["n"] > 1 for a in agg) else "",
        "plot": str(out),
    }
