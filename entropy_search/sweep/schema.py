"""The schema of a sweep (`tune_configs/*.yaml`) and the search config of each of its trials
(docs/design.md, "Sweeps").

A sweep is a search config (`base`, the same schema as `entropy-search search`) plus the axes to
vary (grid and random choices over any of its keys by dotted name: ``search.reward``,
``search.flops_target``, ``agent.lr``, ``seed``, ``model.name``...), Tune's scheduler and
concurrency, where it is stored, the resources of each trial and of each env runner, and MLflow
settings. `load_sweep_config` validates it (unknown keys, wrong types and out-of-range values,
in the sweep itself, in `base`, and in every value an axis takes, raise `ConfigError` naming the key).
"""

from __future__ import annotations

import copy
import itertools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from ray import tune

from ..config import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SearchConfig,
    Section,
    config_from_dict,
    format_validation_error,
    load_config,
    read_yaml_mapping,
)
from ..errors import ConfigError
from ..ray_runtime import search_bundles
from ..store import resolve_tracking_uri

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
MAX_VALIDATED = 4096


# ---------------------------------------------------------------- the schema


class Axis(Section):
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
        """The Tune search-space domain of this axis."""
        if self.kind == "grid":
            return tune.grid_search(self.values)
        if self.kind == "choice":
            return tune.choice(self.values)
        low, high = getattr(self, self.kind)
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](low, high)


class SchedulerConfig(Section):
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


class SweepResources(Section):
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


class MlflowSettings(Section):
    """Where runs are tracked and what is logged."""

    tracking_uri: str | None = None
    """Tracking URI (`http://head:5000`, `sqlite:///path/mlflow.db`); default: `MLFLOW_TRACKING_URI`, else MLflow's default `sqlite:///mlflow.db` in the current directory."""

    experiment: str | None = None
    """MLflow experiment of the sweep's runs; default: the sweep's name."""

    log_model: bool = True
    """Log each trial's pruned, fine-tuned model with `mlflow.pytorch` (input example and signature included)."""

    registered_model_name: str | None = None
    """Also register each trial's model under this name in the model registry."""


class SweepConfig(Section):
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
    return "; ".join(prefix + format_validation_error(e, SweepConfig) for e in exc.errors())


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
        data = read_yaml_mapping(origin, "sweep config")
        data.setdefault("name", origin.stem)
    overrides = {str(key): value for key, value in (overrides or {}).items()}
    if "base" in overrides:  # a whole base (a file or a mapping) first, so that `base.<key>` overrides apply to it
        data["base"] = overrides.pop("base")
    base = data.get("base")
    if isinstance(base, (str, os.PathLike)):
        base_path = Path(base)
        if not base_path.is_absolute() and origin is not None:
            base_path = origin.parent / base_path
        try:
            data["base"] = read_yaml_mapping(base_path, "search config")
        except ConfigError as exc:
            raise ConfigError(f"base: {exc}") from None
    for key, value in overrides.items():
        _set_dotted(data, key, value)
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
        sweep.mlflow.tracking_uri = resolve_tracking_uri(sweep.mlflow.tracking_uri)
    validate_axes(sweep)
    return sweep


def validate_axes(sweep: SweepConfig) -> None:
    """Every grid point (up to a few thousand) and every value of the random axes makes a valid search config."""
    points = sweep.grid_points()[:MAX_VALIDATED] or [{}]
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
    return search_bundles(trial_config(sweep, params), cpus=sweep.resources.cpus_per_trial,
                          gpus=sweep.resources.gpus_per_trial)


def trial_resources(sweep: SweepConfig):
    """Tune's resource request of each trial: its placement group (`trial_bundles`)."""

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
