"""MLflow tracking of sweeps: one parent run per sweep, one child run per Tune trial.

The only module that imports MLflow (the pure tables it logs are in `entropy_search.summary`). What is recorded:

* experiment: tagged as model training (``mlflow.experimentKind``), and per sweep a saved runs view
  (its trials with FLOPs ratio and accuracies as columns and charts) that `sweep_links` addresses;
* parent run (tag ``entropy_search.role=sweep``): the sweep's settings as params, the environment as
  tags, and at the end the cross-trial summary table (``summary.csv``, ``summary.md``,
  ``summary.json``) and the FLOPs-versus-accuracy comparison plot (``comparison.png``), both shown in
  its description (``mlflow.note.content``) with a link to each trial's run;
* child run per trial (tags ``mlflow.parentRunId`` and ``entropy_search.trial_name``): params = the
  trial's fully resolved search config flattened to dotted keys; tags = git commit, package, Ray,
  torch and MLflow versions, hardware; metrics per training iteration (step = iteration: reward
  mean/max, the best candidate's FLOPs and parameter ratios, entropy and held-out accuracy,
  candidates evaluated, candidates per second...); final metrics (test accuracy before/after
  fine-tuning: unprefixed, of the delivered network, the one ``best_pruned.pt`` holds; ``agent_*``, of
  the agent's own pick; ``uniform_*``/``random_*``, of the baselines; cost); tag
  ``entropy_search.delivered`` = which finalist was delivered; artifacts: the table of every evaluated
  candidate (``candidates.csv``), the delivered network's policy with the agent's next to it
  (``policy.json``), the FLOPs-versus-accuracy scatter (``scatter.png``), ``result.json``/``config.yaml``,
  the ONNX export when present, and the delivered network itself (``mlflow.pytorch``, with input example,
  signature, and its own MACs, kept channels and test accuracy as the logged model's params and metric).

Runs are found again by tags, never created twice: a resumed sweep reuses its parent run (tag
``entropy_search.sweep_dir``) and a restarted trial its child run (tag ``entropy_search.trial_name``).

The tracking URI is, in this order: the explicit one (sweep config, ``--tracking-uri``),
``MLFLOW_TRACKING_URI``, MLflow's default ``sqlite:///mlflow.db`` in the current directory. Local
stores are made absolute (Tune trials run in other working directories) and their experiments keep
their artifacts next to the database (``<db dir>/mlruns/<experiment>``).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import mlflow.tracking._tracking_service.utils as mlflow_service
import numpy as np
import ray
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.models import infer_signature

from .data import load_data
from .errors import EntropySearchError
from .jsonio import read_jsonl
from .plots import candidate_scatter
from .problem import PEER_RECIPES, load_checkpoint, load_model
from .store import local_store_dir, resolve_tracking_uri
from .summary import (
    delivered_network,
    final_metrics,
    final_stage_metrics,
    finite,
    flatten,
    format_table,
    numeric,
    policy_file,
    upgrade_metrics,
    write_candidate_table,
    write_summary,
)
from .utils import environment_info

ROLE_TAG = "entropy_search.role"
SWEEP_TAG = "entropy_search.sweep"
SWEEP_DIR_TAG = "entropy_search.sweep_dir"
TRIAL_ID_TAG = "entropy_search.trial_id"
TRIAL_NAME_TAG = "entropy_search.trial_name"
AXES_TAG = "entropy_search.axes"
#: Which finalist the final stage delivered (uniform, top1, ..., random).
DELIVERED_TAG = "entropy_search.delivered"
STATUS_NOTE_TAG = "entropy_search.status_note"
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"
#: The experiment tag MLflow 3 reads to tell model training from GenAI experiments, and its value for ours.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: Experiment tag prefix of a shared runs view (what the UI's "Share" button saves; the URL names its key).
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
#: Final metrics shown as columns of a sweep's runs view, in this order: the delivered network's first, then the
#: agent's own pick and the baselines.
VIEW_METRICS = ("macs_ratio", "test_accuracy", "heldout_accuracy_after_finetune", "params_ratio", "agent_macs_ratio",
                "agent_test_accuracy", "uniform_test_accuracy", "random_test_accuracy",
                *(f"{name}_test_accuracy" for name in PEER_RECIPES))

#: MLflow limits: params per batch and characters per param value.
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_MAX_PARAM_CHARS = 6000

# ---------------------------------------------------------------- store and client


def client(uri: str | None = None):
    """An MlflowClient on the resolved tracking URI."""
    return MlflowClient(tracking_uri=resolve_tracking_uri(uri))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "experiment"


def get_or_create_experiment(mlclient, name: str, tracking_uri: str) -> str:
    """The id of experiment `name`, created (or restored from the bin) when needed, marked as model training."""
    found = mlclient.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            mlclient.restore_experiment(found.experiment_id)
        mark_model_training(mlclient, found)
        return found.experiment_id
    location = None
    store = local_store_dir(tracking_uri) if tracking_uri.startswith("sqlite:") else None
    if store is not None:
        location = (store / "mlruns" / _slug(name)).resolve().as_uri()
    try:
        return mlclient.create_experiment(name, artifact_location=location,
                                          tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # created meanwhile by another process
        found = mlclient.search_experiments(view_type=ViewType.ALL, filter_string=f"name = '{_quote(name)}'")
        if found:
            return found[0].experiment_id
        raise


def mark_model_training(mlclient, experiment) -> None:
    """Tag an experiment as model training (experiments made before the tag existed lack it)."""
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        mlclient.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def _quote(value: str) -> str:
    return str(value).replace("'", "\\'")


# ---------------------------------------------------------------- params, tags, metrics


def hardware() -> dict[str, str]:
    """CPU model and count, GPU model and count of this machine (where the calling process runs)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"hardware.cpu": cpu, "hardware.cpu_count": str(os.cpu_count()), "hardware.node": platform.node()}
    try:
        if torch.cuda.is_available():
            info["hardware.gpu"] = torch.cuda.get_device_name(0)
            info["hardware.gpu_count"] = str(torch.cuda.device_count())
        else:
            info["hardware.gpu"] = "none"
    except Exception:  # noqa: BLE001 - hardware tags are informative only
        pass
    info["hardware"] = f"{cpu} x{os.cpu_count()}; GPU: {info.get('hardware.gpu', 'none')}"
    return info


def environment_tags() -> dict[str, str]:
    """Git commit, package/Ray/torch/MLflow versions and hardware, as run tags."""
    info = environment_info()
    commit = os.environ.get("ENTROPY_SEARCH_GIT_COMMIT") or info.get("git_commit", "unknown")
    tags = {f"env.{k}": str(v) for k, v in info.items()}
    tags["env.git_commit"] = commit
    tags["mlflow.source.git.commit"] = commit
    tags["env.package_version"] = str(info.get("entropy_search_version"))
    tags["env.ray"] = ray.__version__
    tags["env.mlflow"] = mlflow.__version__
    tags.update(hardware())
    return tags


def log_metrics(mlclient, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
    """Log the finite numbers of `metrics` at `step` in batches."""
    now = int(time.time() * 1000)
    items = [Metric(k, v, now, int(step)) for k, v in numeric(metrics).items()]
    for i in range(0, len(items), _METRICS_PER_BATCH):
        mlclient.log_batch(run_id, metrics=items[i:i + _METRICS_PER_BATCH], synchronous=True)


def log_params(mlclient, run_id: str, params: Mapping[str, str]) -> None:
    """Log params in batches, skipping those the run already holds (a resumed run keeps its params)."""
    have = mlclient.get_run(run_id).data.params
    items = [Param(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in params.items() if k not in have]
    for i in range(0, len(items), _PARAMS_PER_BATCH):
        mlclient.log_batch(run_id, params=items[i:i + _PARAMS_PER_BATCH], synchronous=True)


def set_tags(mlclient, run_id: str, tags: Mapping[str, Any]) -> None:
    items = [RunTag(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in tags.items()]
    for i in range(0, len(items), _PARAMS_PER_BATCH):
        mlclient.log_batch(run_id, tags=items[i:i + _PARAMS_PER_BATCH], synchronous=True)


def set_status(mlclient, run_id: str, status: str, note: str | None = None) -> None:
    """RUNNING, FINISHED, FAILED or KILLED, with an optional note (tag ``entropy_search.status_note``)."""
    if note:
        set_tags(mlclient, run_id, {STATUS_NOTE_TAG: note})
    if status == "RUNNING":
        mlclient.update_run(run_id, status="RUNNING")
    else:
        mlclient.set_terminated(run_id, status=status)


# ---------------------------------------------------------------- finding runs


def _search(mlclient, experiment_ids: Sequence[str], filter_string: str, order_by=None) -> list:
    runs, token = [], None
    while True:
        page = mlclient.search_runs(list(experiment_ids), filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                                    max_results=1000, order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_sweep_run(mlclient, *, sweep_dir: str | None = None, name: str | None = None,
                   experiment_ids: Sequence[str] | None = None):
    """The latest parent run of a sweep, by its folder (exact) or its name; None if there is none."""
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in mlclient.search_experiments()]
    if not experiment_ids:
        return None
    clauses = [f"tags.`{ROLE_TAG}` = 'sweep'"]
    if sweep_dir is not None:
        clauses.append(f"tags.`{SWEEP_DIR_TAG}` = '{_quote(sweep_dir)}'")
    if name is not None:
        clauses.append(f"tags.`{SWEEP_TAG}` = '{_quote(name)}'")
    runs = _search(mlclient, experiment_ids, " and ".join(clauses), order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def trial_runs(mlclient, experiment_id: str, parent_run_id: str) -> list:
    """Every child run of a sweep's parent run, oldest first."""
    flt = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{ROLE_TAG}` = 'trial'"
    return _search(mlclient, [experiment_id], flt, order_by=["attributes.start_time ASC"])


def find_trial_run(mlclient, experiment_id: str, parent_run_id: str, trial_name: str):
    """The child run of a trial, by the trial's name (stable across Tune restores and restarts, unlike its id)."""
    flt = (f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_NAME_TAG}` = '{_quote(trial_name)}'")
    runs = _search(mlclient, [experiment_id], flt, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


# ---------------------------------------------------------------- the sweep's parent run


def open_sweep_run(mlclient, experiment_id: str, *, name: str, sweep_dir: str, params: Mapping[str, str],
                   tags: Mapping[str, str], resume: bool) -> tuple[str, bool]:
    """The parent run of a sweep: reused when resuming (found by its folder), else created.

    Returns (run_id, reused)."""
    run = find_sweep_run(mlclient, sweep_dir=sweep_dir, experiment_ids=[experiment_id]) if resume else None
    if run is not None:
        set_status(mlclient, run.info.run_id, "RUNNING")
        return run.info.run_id, True
    all_tags = {ROLE_TAG: "sweep", SWEEP_TAG: name, SWEEP_DIR_TAG: sweep_dir, **tags}
    run = mlclient.create_run(experiment_id, tags=all_tags, run_name=name)
    log_params(mlclient, run.info.run_id, params)
    publish_sweep_view(mlclient, experiment_id, run.info.run_id)
    return run.info.run_id, False


# ---------------------------------------------------------------- what the MLflow UI opens on
#
# MLflow 3.17's UI chooses between its GenAI and its model-training navigation by the URL parameter
# `workflowType` (else the browser's last choice, GenAI at first); older MLflow 3 releases read the
# experiment tag `mlflow.experimentKind`. Our addresses carry the parameter and our experiments the tag.


def sweep_view_key(parent_run_id: str) -> str:
    """The key of a sweep's shared runs view (experiment tag ``mlflow.sharedViewState.<key>``)."""
    return f"entropy-search-{parent_run_id}"


def sweep_view_state(parent_run_id: str) -> dict[str, Any]:
    """A sweep's runs view, in the format the UI saves for its "Share" button: the sweep's trials (a
    filter lists them flat instead of folded under the parent run), sorted by FLOPs ratio, the final
    FLOPs ratio and accuracies as columns, and charts of FLOPs ratio versus test and held-out accuracy
    and of the reward per iteration."""
    section = "entropy-search-sweep"
    columns = [f"tags.`{DELIVERED_TAG}`"] + [f"metrics.`{key}`" for key in VIEW_METRICS]

    def chart(uuid: str, **config) -> dict[str, Any]:
        return {"uuid": f"entropy-search-{uuid}", "runsCountToCompare": 100, "metricSectionId": section,
                "deleted": False, "isGenerated": False, **config}

    def scatter(y: str, title: str) -> dict[str, Any]:
        return chart(y, type="SCATTER", displayName=title, xaxis={"key": "macs_ratio", "type": "METRIC"},
                     yaxis={"key": y, "type": "METRIC"})

    def line(key: str) -> dict[str, Any]:
        return chart(key, type="LINE", displayName=key, metricKey=key, selectedMetricKeys=[key], xAxisKey="step",
                     scaleType="linear", lineSmoothness=0)

    return {
        "searchFilter": f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
        "orderByKey": "metrics.`macs_ratio`",
        "orderByAsc": True,
        "selectedColumns": columns,
        "columnOrder": columns,
        "compareRunCharts": [scatter("test_accuracy", "FLOPs ratio vs test accuracy after fine-tuning"),
                             scatter("heldout_accuracy", "FLOPs ratio vs held-out accuracy at search time"),
                             line("best_reward"), line("reward_mean")],
        "compareRunSections": [{"uuid": section, "name": "FLOPs vs accuracy", "display": True, "isReordered": False,
                                "deleted": False, "isGenerated": False}],
    }


def publish_sweep_view(mlclient, experiment_id: str, parent_run_id: str) -> None:
    """Save the sweep's runs view on its experiment (the address in `sweep_links` opens it)."""
    mlclient.set_experiment_tag(experiment_id, SHARED_VIEW_PREFIX + sweep_view_key(parent_run_id),
                                json.dumps(sweep_view_state(parent_run_id)))


def run_link(experiment_id: str, run_id: str) -> str:
    """A run's page, relative to the UI's root address (a URL fragment)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def sweep_links(experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """The UI pages of a sweep, relative to the UI's root address: ``runs`` (its trials with FLOPs and
    accuracy as columns and charts) and ``parent`` (the parent run: description, summary, plot)."""
    return {"runs": (f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
                     f"&viewStateShareKey={sweep_view_key(parent_run_id)}"),
            "parent": run_link(experiment_id, parent_run_id)}


def sweep_description(description: str, rows: Sequence[Mapping[str, Any]], experiment_id: str,
                      parent_run_id: str) -> str:
    """The parent run's description (markdown): the sweep's own description, a link to its trials, the
    FLOPs-versus-accuracy plot (the run's ``comparison.png`` artifact) and the summary table, each trial
    linked to its run."""
    links = sweep_links(experiment_id, parent_run_id)
    linked = [{**row, "trial": f"[{row['trial']}]({run_link(experiment_id, row['run_id'])})"} for row in rows]
    return "\n\n".join([
        description,
        f"**[The {len(rows)} trials side by side: FLOPs ratio and accuracy as columns and charts]({links['runs']})**",
        f"![FLOPs ratio vs accuracy per trial](get-artifact?path=comparison.png&run_uuid={parent_run_id})",
        format_table(linked, markdown=True),
    ]) + "\n"


def close_unfinished_trials(mlclient, experiment_id: str, parent_run_id: str, status: str, note: str) -> list[str]:
    """Runs of trials still marked RUNNING (their process died, or the sweep was stopped) get `status`."""
    closed = []
    for run in trial_runs(mlclient, experiment_id, parent_run_id):
        if run.info.status in ("RUNNING", "SCHEDULED"):
            set_status(mlclient, run.info.run_id, status, note)
            closed.append(run.info.run_id)
    return closed


# ---------------------------------------------------------------- one trial's child run


class TrialRun:
    """The child run of one Tune trial, used inside the trial's process (a Ray worker).

    `open()` finds the run of this trial (tag ``entropy_search.trial_name`` under the parent: Tune
    keeps a trial's name, not always its id, across restores and restarts) or creates it, so a
    restarted trial never makes a second run."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, *, trial_id: str, trial_name: str,
                 sweep_name: str, tags: Mapping[str, str] | None = None) -> None:
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.trial_id = trial_id
        self.trial_name = trial_name
        self.sweep_name = sweep_name
        self.tags = dict(tags or {})
        self.client = client(self.tracking_uri)
        self.run_id: str | None = None
        self.previous_status: str | None = None
        self.logged_steps = 0  # iterations a previous attempt of the trial logged: a resume replays them

    def open(self, config: Mapping[str, Any], axes: Mapping[str, Any]) -> str:
        """Find or create the run, log the resolved config as params and set it RUNNING; returns the run id."""
        run = find_trial_run(self.client, self.experiment_id, self.parent_run_id, self.trial_name)
        tags = {**self.tags, **hardware(), ROLE_TAG: "trial", PARENT_TAG: self.parent_run_id,
                TRIAL_ID_TAG: self.trial_id, TRIAL_NAME_TAG: self.trial_name, SWEEP_TAG: self.sweep_name,
                AXES_TAG: json.dumps(dict(axes), default=str)}
        if run is None:
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=self.trial_name)
            self.previous_status = None
        else:
            self.previous_status = run.info.status
            if self.previous_status != "FINISHED":
                set_tags(self.client, run.info.run_id, {**tags, "entropy_search.restarts": str(
                    int(run.data.tags.get("entropy_search.restarts", "0")) + 1)})
            self.logged_steps = int(run.data.metrics.get("iteration", 0))
        self.run_id = run.info.run_id
        log_params(self.client, self.run_id, flatten(config))
        if self.previous_status != "FINISHED":
            set_status(self.client, self.run_id, "RUNNING")
        return self.run_id

    def log_iteration(self, metrics: Mapping[str, Any]) -> None:
        """The metrics of one iteration at step = iteration; an iteration a previous attempt of the trial logged
        (replayed after a resume from an earlier checkpoint) is not logged twice."""
        step = int(metrics.get("iteration", 0))
        if step > self.logged_steps:
            log_metrics(self.client, self.run_id, metrics, step=step)

    def log_result(self, result: Mapping[str, Any], out_dir: str | os.PathLike, *, log_model: bool = True,
                   registered_model_name: str | None = None) -> dict[str, float]:
        """Final metrics and artifacts of a finished search; returns the final metrics."""
        out = Path(out_dir)
        step = int((result.get("cost") or {}).get("iterations") or 0)
        final = final_metrics(result)
        log_metrics(self.client, self.run_id, final, step=step)
        for rung_step, measured in final_stage_metrics(result).items():
            log_metrics(self.client, self.run_id, measured, step=rung_step)
        set_tags(self.client, self.run_id, {DELIVERED_TAG: delivered_network(result).get("label")})
        art = out / "mlflow"
        art.mkdir(parents=True, exist_ok=True)
        records = read_jsonl(out / "candidates.jsonl")
        write_candidate_table(records, art / "candidates.csv")
        (art / "policy.json").write_text(json.dumps(policy_file(result), indent=2) + "\n")
        candidate_scatter(records, result, art / "scatter.png")
        for path in (art / "candidates.csv", art / "policy.json", art / "scatter.png"):
            self.client.log_artifact(self.run_id, str(path))
        for name in ("result.json", "config.yaml"):
            if (out / name).exists():
                self.client.log_artifact(self.run_id, str(out / name), "search")
        files = result.get("files") or {}
        if files.get("onnx") and Path(files["onnx"]).exists():
            self.client.log_artifact(self.run_id, files["onnx"], "onnx")
        if log_model and files.get("pytorch") and Path(files["pytorch"]).exists():
            self.log_model(result, files["pytorch"], registered_model_name=registered_model_name)
        return final

    def log_model(self, result: Mapping[str, Any], path: str, *, registered_model_name: str | None = None) -> None:
        """The delivered network (`best_pruned.pt` at `path`) with `mlflow.pytorch`, an input example, its
        signature, and its own figures: MACs ratio, MACs and kept channels as params, its test accuracy after
        fine-tuning as the model's metric."""
        model = load_model(path)
        example = input_example(result)
        with torch.no_grad():
            output = model(torch.from_numpy(example)).numpy()
        signature = infer_signature(example, output)
        delivered = delivered_network(result)
        with _fluent_store(self.tracking_uri), mlflow.start_run(run_id=self.run_id, log_system_metrics=False):
            info = mlflow.pytorch.log_model(
                model, name="pruned_model", input_example=example, signature=signature,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
                registered_model_name=registered_model_name,
                params={"delivered": delivered.get("label"), "macs_ratio": delivered.get("macs_ratio"),
                        "macs": delivered.get("macs"), "kept_channels": json.dumps(delivered.get("kept_channels")),
                        "dropped_blocks": json.dumps(delivered.get("dropped_blocks") or [])},
            )
            test_acc = delivered.get("test_accuracy_after_finetune")
            if finite(test_acc):
                mlflow.log_metric("model_test_accuracy", float(test_acc), model_id=getattr(info, "model_id", None))
        # leaving the context set the run FINISHED; the caller sets the final status itself

    def finish(self, status: str = "FINISHED", note: str | None = None) -> None:
        if self.run_id is not None:
            set_status(self.client, self.run_id, status, note)


@contextlib.contextmanager
def _fluent_store(uri: str):
    """Point MLflow's fluent API (needed by `mlflow.pytorch.log_model`) at `uri`, and back afterwards
    (`mlflow.set_tracking_uri` also sets MLFLOW_TRACKING_URI, which would leak to later runs)."""
    before = getattr(mlflow_service, "_tracking_uri", None)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def input_example(result: Mapping[str, Any]):
    """Two real test images of the searched data set (preprocessed as the search recorded), or zeros."""
    cfg = result.get("config") or {}
    try:
        ckpt = load_checkpoint(cfg["model"]["checkpoint"])
        shape = (ckpt.in_channels, ckpt.image_size, ckpt.image_size)
    except Exception:  # noqa: BLE001
        ckpt, shape = None, None
    try:
        pre = (result.get("base") or {}).get("preprocessing") or {}  # as the search fed the network
        resized = {k: pre.get(k) for k in ("image_size", "channels")} if cfg["data"]["name"].startswith("imagefolder") else {}
        splits = load_data(cfg["data"]["name"], cfg["data"].get("root"), seed=int(cfg.get("seed", 0)),
                           mean=pre.get("mean") or None, std=pre.get("std") or None, **resized)
        x = np.stack([splits.test[i][0].numpy() for i in range(2)]).astype(np.float32)
        if shape is None or tuple(x.shape[1:]) == shape:
            return x
    except Exception:  # noqa: BLE001 - an example of the right shape is enough
        pass
    if shape is None:
        raise EntropySearchError("cannot build an input example: the baseline checkpoint is unreadable")
    return np.zeros((2, *shape), dtype=np.float32)


# ---------------------------------------------------------------- what a finished search logs


# ---------------------------------------------------------------- the cross-trial summary

def sweep_rows(mlclient, experiment_id: str, parent_run_id: str) -> list[dict]:
    """One row per trial from MLflow: trial name, status, axis values, final metrics (last values)."""
    rows = []
    for run in trial_runs(mlclient, experiment_id, parent_run_id):
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        try:
            axes = json.loads(tags.get(AXES_TAG, "{}"))
        except json.JSONDecodeError:
            axes = {}
        row: dict[str, Any] = {
            "trial": tags.get(TRIAL_NAME_TAG, run.info.run_name),
            "trial_id": tags.get(TRIAL_ID_TAG),
            "run_id": run.info.run_id,
            "status": run.info.status,
            "axes": axes,
            "reward_kind": params.get("search.reward"),
            "flops_target": _float(params.get("search.flops_target")),
            "model": params.get("model.name"),
            "seed": params.get("seed"),
            "delivered": tags.get(DELIVERED_TAG),
        }
        row.update(upgrade_metrics(metrics))
        if "macs_ratio" not in metrics and "best_macs_ratio" in metrics:
            row["search_macs_ratio"] = metrics["best_macs_ratio"]
        rows.append(row)
    return sorted(rows, key=lambda r: str(r["trial"]))


def _float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def log_sweep_summary(mlclient, experiment_id: str, parent_run_id: str, out_dir: str | os.PathLike,
                      *, title: str = "", description: str = "") -> tuple[list[dict], dict[str, Path]]:
    """Build the summary from the child runs, write it to `out_dir`, log it on the parent run and tell
    it in the run's description (`sweep_description`)."""
    rows = sweep_rows(mlclient, experiment_id, parent_run_id)
    paths = write_summary(rows, out_dir, title=title)
    for path in paths.values():
        mlclient.log_artifact(parent_run_id, str(path))
    set_tags(mlclient, parent_run_id, {
        NOTE_TAG: sweep_description(description or title, rows, experiment_id, parent_run_id)})
    publish_sweep_view(mlclient, experiment_id, parent_run_id)  # sweeps begun before the view existed
    statuses = [r["status"] for r in rows]
    log_metrics(mlclient, parent_run_id, {
        "trials": len(rows), "trials_finished": statuses.count("FINISHED"),
        "trials_failed": statuses.count("FAILED"), "trials_killed": statuses.count("KILLED"),
    })
    return rows, paths
