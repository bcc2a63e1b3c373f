"""Sweeps of RL pruning searches with Ray Tune (`entropy-search sweep tune_configs/<name>.yaml`).

A sweep is a search config (`base`, the same schema as `entropy-search search`) plus the axes to
vary (grid and random choices over any of its keys by dotted name: ``search.reward``,
``search.flops_target``, ``agent.lr``, ``seed``, ``model.name``...), Tune's scheduler and
concurrency, where it is stored, the resources of each trial and of each env runner, and MLflow
settings. `load_sweep_config` validates it (unknown keys, wrong types and out-of-range values,
in the sweep itself, in `base`, and in every value an axis takes, raise `ConfigError` naming the key).

`run_sweep`:

1. joins the Ray cluster (`resources.address`, else ``RAY_ADDRESS``) or starts Ray locally;
2. trains each missing baseline checkpoint once, in a Ray task with a trial's resources (not once per
   trial), and checks that every FLOPs target is reachable before any trial starts;
3. opens (or, with ``resume``, finds again) the sweep's MLflow parent run;
4. runs one Tune trial per point of the axes. Each trial is one RL search through
   `entropy_search.search.run_search` (the code path of `entropy-search search`), in its own folder
   ``<storage_path>/<name>/<trial>/search``, in a placement group holding the trial's own process
   (``resources.cpus_per_trial``/``gpus_per_trial``) and one bundle per env runner. The search's
   per-iteration metrics go to Tune (`tune.report`) and to the trial's MLflow child run; at the end
   the trial logs its artifacts and model (`entropy_search.tracking.TrialRun`);
5. closes runs left open (crashed trials: FAILED; an interrupted sweep: KILLED) and logs the
   summary table and comparison plot on the parent run.

``resume=True`` continues an interrupted sweep with `tune.Tuner.restore`: finished trials are not run
again and keep their MLflow runs, unfinished ones are restarted and continue their search from its
last checkpoint, logging into the run they had.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .config import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SearchConfig,
    _Section,
    config_from_dict,
    load_config,
)
from .errors import ConfigError, EntropySearchError

log = logging.getLogger(__name__)

#: Metrics each trial reports to Tune after every iteration (usable as `scheduler.metric`).
ITERATION_METRICS = (
    "reward_mean", "reward_max", "best_reward", "best_macs_ratio", "best_params_ratio", "best_entropy",
    "best_accuracy", "candidates", "evaluations", "cache_hits", "candidates_per_second", "evaluations_per_second",
)

#: Keys of the search config that the sweep sets itself and an axis may not vary.
_RESERVED_AXES = ("output.dir",)
#: Path-valued keys of the search config, resolved against the current directory by the driver.
_PATH_KEYS = ("model.checkpoint", "data.root")
#: At most this many grid points are validated one by one before the sweep starts.
_MAX_VALIDATED = 4096


# ---------------------------------------------------------------- the schema


class Axis(_Section):
    """One varied key. A plain YAML list is a grid; otherwise exactly one of the keys below."""

    grid: list[Any] | None = None
    """Every value, each in its own trials (Tune `grid_search`); grids multiply."""

    choice: list[Any] | None = None
    """One value drawn at random per trial (Tune `choice`)."""

    uniform: tuple[float, float] | None = None
    """A float drawn uniformly in [low, high] per trial."""

    loguniform: tuple[float, float] | None = None
    """A float drawn log-uniformly in [low, high] per trial (low > 0)."""

    randint: tuple[int, int] | None = None
    """An integer drawn uniformly in [low, high) per trial."""

    @model_validator(mode="before")
    @classmethod
    def _list_is_grid(cls, value):
        if isinstance(value, (list, tuple)):
            return {"grid": list(value)}
        if not isinstance(value, dict):
            raise ValueError("an axis is a list of values (a grid) or one of {grid, choice, uniform, loguniform, randint}")
        return value

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform, randint (got {given or 'none'})")
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("grid", "choice") and not value:
            raise ValueError(f"{kind}: needs at least one value")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind}: low must be < high, got {list(value)}")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform: low must be > 0, got {value[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    @property
    def values(self) -> list:
        return list(getattr(self, self.kind))

    def check_values(self) -> list:
        """Values that validate the axis: every listed value, the ends of a range."""
        if self.kind == "randint":
            return [int(self.randint[0]), int(self.randint[1]) - 1]
        return self.values

    def tune_domain(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(self.values)
        if self.kind == "choice":
            return tune.choice(self.values)
        low, high = getattr(self, self.kind)
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](low, high)


class SchedulerConfig(_Section):
    """Tune's trial scheduler."""

    type: Literal["fifo", "asha"] = "fifo"
    """`fifo`: every trial runs to its stop rule (the comparison sweeps); `asha`: stop poor trials early (hyper-parameter tuning of one reward)."""

    metric: str = "best_reward"
    """Per-iteration metric the scheduler compares (one of ITERATION_METRICS). Rewards of different kinds are not comparable: use ASHA within one reward."""

    mode: Literal["max", "min"] = "max"
    """Whether the metric is maximised or minimised."""

    grace_period: PositiveInt = 5
    """ASHA: iterations every trial runs before it can be stopped."""

    reduction_factor: float = 3.0
    """ASHA: the fraction 1/reduction_factor of the trials continues at each rung."""

    max_t: PositiveInt | None = None
    """ASHA: the most iterations of a trial; default: the search's `stop.iterations`."""

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v not in ITERATION_METRICS:
            raise ValueError(f"must be one of {', '.join(ITERATION_METRICS)}")
        return v

    @field_validator("reduction_factor")
    @classmethod
    def _above_one(cls, v: float) -> float:
        if not v > 1:
            raise ValueError("must be > 1")
        return v


class SweepResources(_Section):
    """Where the sweep runs and the resources of each trial (a placement group: the trial's own
    process, plus one bundle per env runner)."""

    cpus_per_trial: PositiveFloat = 1.0
    """CPUs of the trial's own process: the agent's learner, the baselines' evaluations, fine-tuning (fractions allowed)."""

    gpus_per_trial: NonNegativeFloat = 0.0
    """GPUs of the trial's own process (fine-tuning, the baselines); fractions share one GPU between trials."""

    num_env_runners: NonNegativeInt | None = None
    """Env runners (Ray workers evaluating candidates) of every trial; default: the search config's `resources.num_env_runners`."""

    cpus_per_env_runner: NonNegativeFloat | None = None
    """CPUs per env runner; default: the search config's `resources.num_cpus_per_env_runner`."""

    gpus_per_env_runner: NonNegativeFloat | None = None
    """GPUs per env runner (e.g. 0.25: four runners share a GPU); default: the search config's `resources.num_gpus_per_env_runner`."""

    baseline_cpus: PositiveFloat | None = None
    """CPUs of the task that trains a missing baseline checkpoint; default: a whole trial's CPUs."""

    baseline_gpus: NonNegativeFloat | None = None
    """GPUs of that task; default: 1 when trials use GPUs, else 0."""

    num_cpus: PositiveInt | None = None
    """CPUs of a local Ray instance started by the sweep (default: all); ignored when joining a cluster."""

    num_gpus: NonNegativeInt | None = None
    """GPUs of a local Ray instance started by the sweep (default: all); ignored when joining a cluster."""

    address: str | None = None
    """Ray cluster to join (`auto`, `ray://host:10001`); default: `RAY_ADDRESS` if set, else a local Ray."""

    def search_overrides(self) -> dict[str, Any]:
        """The search config keys these settings override in every trial."""
        out: dict[str, Any] = {}
        if self.num_env_runners is not None:
            out["resources.num_env_runners"] = self.num_env_runners
        if self.cpus_per_env_runner is not None:
            out["resources.num_cpus_per_env_runner"] = self.cpus_per_env_runner
        if self.gpus_per_env_runner is not None:
            out["resources.num_gpus_per_env_runner"] = self.gpus_per_env_runner
        return out


class MlflowSettings(_Section):
    """Where runs are tracked and what is logged."""

    tracking_uri: str | None = None
    """Tracking URI (`http://head:5000`, `sqlite:///path/mlflow.db`); default: `MLFLOW_TRACKING_URI`, else MLflow's default `sqlite:///mlflow.db` in the current directory."""

    experiment: str | None = None
    """MLflow experiment of the sweep's runs; default: the sweep's name."""

    log_model: bool = True
    """Log each trial's pruned, fine-tuned model with `mlflow.pytorch` (input example and signature included)."""

    registered_model_name: str | None = None
    """Also register each trial's model under this name in the model registry."""


class SweepConfig(_Section):
    """A Ray Tune sweep of RL pruning searches."""

    name: str
    """Name of the sweep: its folder under `storage_path`, its MLflow parent run and default experiment (letters, digits, `-`, `_`, `.`)."""

    description: str = ""
    """Free text, logged on the parent run."""

    base: dict[str, Any] = Field(default_factory=dict)
    """The search config every trial starts from (the schema of `entropy-search search`), inline or as the path of a YAML file (relative to the sweep file). `output.dir` is set per trial; a missing `model.checkpoint` defaults to `<storage_path>/baselines/<model>-<data>-e<train_epochs>.pt`, trained once before the trials."""

    axes: dict[str, Axis] = Field(default_factory=dict)
    """Keys of the search config (dotted names) to vary: `search.reward: [entropy, accuracy]` (grid), `agent.lr: {loguniform: [1e-4, 1e-3]}`, `seed: {grid: [0, 1, 2]}`."""

    num_samples: PositiveInt = 1
    """Repetitions of the grid (random axes are drawn anew for each)."""

    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    """Tune's trial scheduler."""

    max_concurrent_trials: PositiveInt | None = None
    """Trials running at once; default: as many as the resources allow."""

    max_failures: NonNegativeInt = 0
    """Times Tune restarts a crashed trial (the search continues from its last checkpoint)."""

    storage_path: str = "runs/sweeps"
    """Folder of sweeps (relative to the current directory): the sweep lives in `<storage_path>/<name>`."""

    resources: SweepResources = Field(default_factory=SweepResources)
    """Ray cluster, and resources per trial and per env runner."""

    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    """MLflow tracking."""

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", v):
            raise ValueError("use letters, digits, '-', '_' and '.' (at most 100), starting with a letter or digit")
        return v

    @field_validator("axes")
    @classmethod
    def _axis_keys(cls, v: dict) -> dict:
        for key in v:
            if key in _RESERVED_AXES:
                raise ValueError(f"{key}: is set by the sweep for every trial and cannot be an axis")
        return v

    # ------------------------------------------------------------ derived

    @property
    def sweep_dir(self) -> Path:
        return Path(self.storage_path) / self.name

    @property
    def experiment_name(self) -> str:
        return self.mlflow.experiment or self.name

    def param_space(self) -> dict[str, Any]:
        return {key: axis.tune_domain() for key, axis in self.axes.items()}

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the grid axes (random axes left out)."""
        grid = {k: a.values for k, a in self.axes.items() if a.kind == "grid"}
        keys = list(grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]

    def num_trials(self) -> int:
        return len(self.grid_points()) * self.num_samples


# ---------------------------------------------------------------- loading and validation


def _format_errors(exc: ValidationError, prefix: str = "") -> str:
    from .config import _format_error

    return "; ".join(prefix + _format_error(e, SweepConfig) for e in exc.errors())


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        if part == "axes" and i == 0:  # axis keys contain dots: axes.<dotted key>
            node = node.setdefault("axes", {})
            node[".".join(parts[1:])] = value
            return
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: cannot set a sub-key of a non-section value")
        node = child
    node[parts[-1]] = value


def _prefix_errors(message: str, prefix: str) -> str:
    return "; ".join(prefix + part for part in message.split("; "))


def load_sweep_config(
    path_or_dict: str | os.PathLike | Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> SweepConfig:
    """Load and validate a sweep from a YAML file (or a dict), with `overrides` by dotted key
    (``base.stop.iterations``, ``max_concurrent_trials``, ``axes.seed``...).

    Relative paths of the base config (checkpoint, data root) and `storage_path` are made absolute
    against the current directory, so trials (in other working directories and processes) find them.
    Every value an axis can take is validated against the search schema here, before anything runs.
    """
    where = Path.cwd()
    if isinstance(path_or_dict, Mapping):
        data = copy.deepcopy(dict(path_or_dict))
        origin = None
    else:
        origin = Path(path_or_dict)
        if not origin.is_file():
            raise ConfigError(f"sweep config not found: {origin}")
        try:
            data = yaml.safe_load(origin.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{origin}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{origin}: expected a mapping at the top level")
        data.setdefault("name", origin.stem)
    for key, value in (overrides or {}).items():
        _set_dotted(data, str(key), value)
    base = data.get("base")
    if isinstance(base, (str, os.PathLike)):
        base_path = Path(base)
        if not base_path.is_absolute() and origin is not None:
            base_path = origin.parent / base_path
        if not base_path.is_file():
            raise ConfigError(f"base: search config not found: {base_path}")
        try:
            data["base"] = yaml.safe_load(base_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"base: {base_path}: not valid YAML: {exc}") from None
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None
    try:
        config_from_dict(sweep.base)
    except ConfigError as exc:
        raise ConfigError(_prefix_errors(str(exc), "base.")) from None
    # absolute paths, decided here (trials run elsewhere)
    sweep.storage_path = str((where / Path(sweep.storage_path).expanduser()).resolve())
    for dotted in _PATH_KEYS:
        section, key = dotted.split(".")
        value = (sweep.base.get(section) or {}).get(key)
        if value:
            sweep.base[section][key] = str((where / Path(value).expanduser()).resolve())
        axis = sweep.axes.get(dotted)
        if axis is not None and axis.kind in ("grid", "choice"):
            resolved = [str((where / Path(v).expanduser()).resolve()) if v else v for v in axis.values]
            setattr(axis, axis.kind, resolved)
    if sweep.mlflow.tracking_uri:
        from .tracking import resolve_tracking_uri

        sweep.mlflow.tracking_uri = resolve_tracking_uri(sweep.mlflow.tracking_uri)
    validate_axes(sweep)
    return sweep


def validate_axes(sweep: SweepConfig) -> None:
    """Every grid point (up to a few thousand) and every value of the random axes makes a valid search config."""
    points = sweep.grid_points()[:_MAX_VALIDATED] or [{}]
    randoms = {k: a for k, a in sweep.axes.items() if a.kind != "grid"}
    first = {k: a.check_values()[0] for k, a in randoms.items()}
    checks = [{**p, **first} for p in points]
    for key, axis in randoms.items():
        for value in axis.check_values():
            checks.append({**points[0], **first, key: value})
    for params in checks:
        try:
            trial_config(sweep, params)
        except ConfigError as exc:
            values = ", ".join(f"{k}={v!r}" for k, v in params.items())
            raise ConfigError(_prefix_errors(str(exc), "axes: ") + (f" (trial {values})" if values else "")) from None


def baseline_path(sweep: SweepConfig, config: SearchConfig) -> Path:
    """Default baseline checkpoint of a trial: shared by every trial (and sweep) with the same model, data and epochs."""
    model = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.model.name)
    data = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.data.name)
    return Path(sweep.storage_path) / "baselines" / f"{model}-{data}-e{config.model.train_epochs}.pt"


def trial_config(sweep: SweepConfig, params: Mapping[str, Any], output_dir: str | os.PathLike | None = None) -> SearchConfig:
    """The fully resolved search config of one trial: base + resource overrides + the trial's axis values."""
    overrides = sweep.resources.search_overrides()
    overrides.update(params)
    overrides["output.dir"] = str(output_dir) if output_dir else str(sweep.sweep_dir / "_validation")
    config = load_config(sweep.base, overrides)
    if not config.model.checkpoint:
        config.model.checkpoint = str(baseline_path(sweep, config))
    return config


def trial_bundles(sweep: SweepConfig, params: Mapping[str, Any]) -> list[dict[str, float]]:
    """The placement group of a trial: its own process first, then one bundle per env runner."""
    config = trial_config(sweep, params)
    head = {"CPU": float(sweep.resources.cpus_per_trial)}
    if sweep.resources.gpus_per_trial:
        head["GPU"] = float(sweep.resources.gpus_per_trial)
    res = config.resources
    runner = {}
    if res.num_cpus_per_env_runner:
        runner["CPU"] = float(res.num_cpus_per_env_runner)
    if res.num_gpus_per_env_runner:
        runner["GPU"] = float(res.num_gpus_per_env_runner)
    return [head] + ([runner] * res.num_env_runners if runner else [])


def _trial_resources(sweep: SweepConfig):
    from ray import tune

    def resources(params: dict):
        return tune.PlacementGroupFactory(trial_bundles(sweep, params))

    return resources


def trial_name(trial) -> str:
    """`t00003-reward=entropy-flops_target=0.5`: the trial's index and axis values; its folder name and
    the key of its MLflow run. The index is Tune's variant counter (`experiment_tag`), which a trial
    keeps when it is restored or restarted (its `trial_id` changes on a restart)."""
    tag = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    index = f"{int(tag):05d}" if tag.isdigit() else str(trial.trial_id).rsplit("_", 1)[-1]
    parts = []
    for key, value in (trial.config or {}).items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    name = "-".join([f"t{index}", *parts])
    name = re.sub(r"[^A-Za-z0-9_.=,-]+", "_", name)
    return name[:100]


# ---------------------------------------------------------------- the trial (runs in a Ray worker)


def _materialize(baselines: Mapping[str, bytes]) -> None:
    """Write the baseline checkpoints this node lacks (a node of a cluster without shared disk)."""
    for path, blob in baselines.items():
        target = Path(path)
        if target.exists() or blob is None:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, target)


def run_trial(params: dict, context: dict | None = None) -> None:
    """Tune function trainable: one RL search (`run_search`) tracked in its MLflow child run."""
    from ray import tune

    from .search import CHECKPOINT_DIR, RESULT_FILE, STATE_FILE, run_search
    from .tracking import TrialRun, final_metrics, numeric

    context = context or {}
    sweep: SweepConfig = context["sweep"]
    tctx = tune.get_context()
    trial_id, name = tctx.get_trial_id(), tctx.get_trial_name()
    out = Path(context["sweep_dir"]) / name / "search"
    _materialize(context.get("baselines") or {})
    config = trial_config(sweep, params, out)

    run = TrialRun(context["tracking_uri"], context["experiment_id"], context["parent_run_id"], trial_id=trial_id,
                   trial_name=name, sweep_name=sweep.name, tags=context.get("tags"))
    run.open(config.to_dict(), params)
    result_path = out / RESULT_FILE
    last: dict[str, float] = {}

    if run.previous_status == "FINISHED" and result_path.exists():  # logged completely before: nothing to redo
        result = json.loads(result_path.read_text())
        tune.report({**_last_iteration(result), **final_metrics(result), "trial_done": 1.0})
        return

    def on_iteration(metrics: dict) -> None:
        run.log_iteration(metrics)
        last.clear()
        last.update(numeric(metrics))
        tune.report(dict(last))

    try:
        if result_path.exists() and _same_config(out, config):
            result = json.loads(result_path.read_text())  # the search finished, its logging did not
        else:
            resume = (out / CHECKPOINT_DIR / STATE_FILE).exists() and _same_config(out, config)
            result = run_search(config, resume=resume, overwrite=not resume, progress=False, on_iteration=on_iteration)
        final = run.log_result(result, out, log_model=sweep.mlflow.log_model,
                               registered_model_name=sweep.mlflow.registered_model_name)
    except Exception as exc:
        run.finish("FAILED", note=f"{type(exc).__name__}: {exc}"[:1000])
        raise
    except BaseException as exc:  # stopped (KeyboardInterrupt, SystemExit): resumable
        run.finish("KILLED", note=f"stopped: {type(exc).__name__}")
        raise
    run.finish("FINISHED")
    tune.report({**(last or _last_iteration(result)), **final, "trial_done": 1.0})


def _last_iteration(result: Mapping[str, Any]) -> dict[str, float]:
    from .tracking import numeric

    history = result.get("history") or []
    return numeric(history[-1]) if history else {}


def _same_config(out: Path, config: SearchConfig) -> bool:
    saved = out / "config.yaml"
    if not saved.exists():
        return False
    try:
        before = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError:
        return False
    now = config.to_dict()
    return all(before.get(k) == now.get(k) for k in ("model", "data", "search", "seed"))


# ---------------------------------------------------------------- driver side


def _status_callback(tracking_uri: str, experiment_id: str, parent_run_id: str):
    from ray.tune import Callback

    class MlflowTrialStatus(Callback):
        """Runs of trials that errored become FAILED; those stopped by the scheduler become KILLED."""

        def __init__(self) -> None:
            self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id

        def _close(self, trial, status: str, note: str) -> None:
            from . import tracking

            try:
                mlclient = tracking.client(self.tracking_uri)
                run = tracking.find_trial_run(mlclient, self.experiment_id, self.parent_run_id, trial_name(trial))
                if run is not None and run.info.status in ("RUNNING", "SCHEDULED"):
                    tracking.set_status(mlclient, run.info.run_id, status, note)
            except Exception as exc:  # noqa: BLE001 - never let tracking stop the sweep
                log.warning("could not update the MLflow run of trial %s: %s", trial.trial_id, exc)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._close(trial, "FAILED", "the trial's process failed (see the Tune error file of the trial)")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._close(trial, "KILLED", "stopped early by the scheduler")

    return MlflowTrialStatus()


def _scheduler(sweep: SweepConfig, base: SearchConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = sweep.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    max_t = s.max_t or base.stop.iterations or 100
    return ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=min(s.grace_period, max_t),
                         reduction_factor=s.reduction_factor)


def _start_ray(sweep: SweepConfig) -> bool:
    """Join the cluster (`resources.address` or RAY_ADDRESS) or start a local Ray; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = sweep.resources.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local" always starts a new instance, even where another Ray runs on this machine
        ray.init(address="local", num_cpus=sweep.resources.num_cpus, num_gpus=sweep.resources.num_gpus, **kwargs)
    return True


def _joined_cluster(sweep: SweepConfig) -> bool:
    return bool(sweep.resources.address or os.environ.get("RAY_ADDRESS"))


def _check_fits(sweep: SweepConfig, points: list[dict]) -> None:
    """On a local Ray, a trial needing more than the machine has would wait forever: say so."""
    import ray

    total = ray.cluster_resources()
    for params in points[:_MAX_VALIDATED] or [{}]:
        bundles = trial_bundles(sweep, params)
        for res in ("CPU", "GPU"):
            need = sum(b.get(res, 0.0) for b in bundles)
            have = total.get(res, 0.0)
            if need > have + 1e-9:
                raise ConfigError(
                    f"resources: a trial needs {need:g} {res}s (cpus_per_trial/gpus_per_trial + env runners x their "
                    f"share), Ray has {have:g}; lower resources.cpus_per_trial, num_env_runners or cpus_per_env_runner"
                )


def _train_baselines(sweep: SweepConfig, configs: list[SearchConfig]) -> dict[str, bytes]:
    """Each distinct baseline checkpoint, trained once in a Ray task if missing; returns {path: bytes}."""
    import ray

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
        _materialize(blobs)
    for path in wanted:
        if path not in blobs:
            blobs[path] = Path(path).read_bytes()
    return blobs


def _train_baseline_task(config: dict, threads: int) -> bytes:
    import torch

    from .search import ensure_checkpoint

    torch.set_num_threads(threads)
    cfg = load_config(config, resolve_paths=False)
    return Path(ensure_checkpoint(cfg, progress=False)).read_bytes()


def _check_budgets(configs: list[SearchConfig]) -> None:
    """Every (network, FLOPs target, min_keep, rounding) is reachable: a ConfigError before trials start."""
    from entropy_search.envs import Budget

    from .checkpoint import build_model, load_checkpoint
    from .space import PruningSpace

    spaces: dict[tuple, Any] = {}
    seen: set[tuple] = set()
    for cfg in configs:
        key = (str(cfg.checkpoint_path()), cfg.search.round_to)
        combo = key + (cfg.search.flops_target, cfg.search.min_keep)
        if combo in seen:
            continue
        seen.add(combo)
        if key not in spaces:
            ckpt = load_checkpoint(cfg.checkpoint_path())
            spaces[key] = PruningSpace(build_model(ckpt), ckpt.example_input(), round_to=cfg.search.round_to)
        Budget(spaces[key], cfg.search.flops_target, cfg.search.min_keep).check()


def _sweep_params(sweep: SweepConfig) -> dict[str, str]:
    from .tracking import flatten

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
    from ray import tune

    from . import tracking

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
    configs = [trial_config(sweep, p) for p in (points[:_MAX_VALIDATED] or [{}])]
    base_config = configs[0]

    tracking_uri = tracking.resolve_tracking_uri(sweep.mlflow.tracking_uri)
    started = _start_ray(sweep)
    try:
        if not _joined_cluster(sweep):
            _check_fits(sweep, points)
        baselines = _train_baselines(sweep, configs)
        _check_budgets(configs)

        mlclient = tracking.client(tracking_uri)
        experiment_id = tracking.get_or_create_experiment(mlclient, sweep.experiment_name, tracking_uri)
        env_tags = tracking.environment_tags()
        parent_id, reused = tracking.open_sweep_run(
            mlclient, experiment_id, name=sweep.name, sweep_dir=str(sweep_dir), params=_sweep_params(sweep),
            tags={**env_tags, "mlflow.note.content": sweep.description or f"sweep {sweep.name}",
                  tracking.AXES_TAG: json.dumps(list(sweep.axes))},
            resume=resume)
        if verbose:
            print(f"sweep {sweep.name}: {sweep.num_trials()} trial(s), MLflow experiment {sweep.experiment_name!r} "
                  f"run {parent_id}{' (resumed)' if reused else ''} at {tracking_uri}", flush=True)
        trial_tags = {k: v for k, v in env_tags.items() if not k.startswith("hardware")}
        context = {"sweep": sweep, "sweep_dir": str(sweep_dir), "tracking_uri": tracking_uri,
                   "experiment_id": experiment_id, "parent_run_id": parent_id, "tags": trial_tags,
                   "baselines": baselines}
        trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), _trial_resources(sweep))

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
                    callbacks=[_status_callback(tracking_uri, experiment_id, parent_id)],
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
                                                 title=f"sweep {sweep.name}")
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
            import ray

            ray.shutdown()
    return {
        "name": sweep.name, "sweep_dir": str(sweep_dir), "tracking_uri": tracking_uri,
        "experiment": sweep.experiment_name, "experiment_id": experiment_id, "parent_run_id": parent_id,
        "rows": rows, "table": tracking.format_table(rows), "summary": {k: str(v) for k, v in paths.items()},
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
    from . import tracking

    name, sweep_dir = sweep, None
    path = Path(sweep)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        cfg = load_sweep_config(path)
        name, sweep_dir = cfg.name, str(cfg.sweep_dir)
        tracking_uri = tracking_uri or cfg.mlflow.tracking_uri
    elif path.is_dir():
        sweep_dir, name = str(path.resolve()), None
    uri = tracking.resolve_tracking_uri(tracking_uri)
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
    from .plots import sweep_comparison

    sweep_comparison(rows, out, title=f"sweep {run_name}")
    agg = tracking.aggregate_rows(rows)
    return {
        "name": run_name, "sweep_dir": run_dir, "tracking_uri": uri, "experiment_id": experiment_id,
        "parent_run_id": run.info.run_id, "status": run.info.status, "rows": rows,
        "table": tracking.format_table(rows), "aggregate": agg,
        "aggregate_table": tracking.format_aggregate(agg) if any(a["n"] > 1 for a in agg) else "",
        "plot": str(out),
    }
