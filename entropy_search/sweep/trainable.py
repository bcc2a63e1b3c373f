"""The Tune trainable of a sweep: one RL search per trial, tracked in its MLflow child run, and the
callback that closes the runs of trials that failed or were stopped (docs/design.md, "Sweeps")."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune import Callback

from .. import tracking
from ..config import SearchConfig
from ..rl.rundir import CHECKPOINT_DIR, RESULT_FILE, STATE_FILE, saved_config_difference
from ..search import run_search
from ..summary import final_metrics, numeric
from .schema import SweepConfig, trial_config, trial_name

log = logging.getLogger(__name__)


def materialize_baselines(baselines: Mapping[str, bytes]) -> None:
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
    context = context or {}
    sweep: SweepConfig = context["sweep"]
    tctx = tune.get_context()
    trial_id, name = tctx.get_trial_id(), tctx.get_trial_name()
    out = Path(context["sweep_dir"]) / name / "search"
    materialize_baselines(context.get("baselines") or {})
    config = trial_config(sweep, params, out)

    run = tracking.TrialRun(context["tracking_uri"], context["experiment_id"], context["parent_run_id"], trial_id=trial_id,
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
    history = result.get("history") or []
    return numeric(history[-1]) if history else {}


def _same_config(out: Path, config: SearchConfig) -> bool:
    return saved_config_difference(out, config) is None


def status_callback(tracking_uri: str, experiment_id: str, parent_run_id: str) -> Callback:
    """A Tune callback: runs of trials that errored become FAILED; those stopped by the scheduler KILLED."""

    class MlflowTrialStatus(Callback):
        """Runs of trials that errored become FAILED; those stopped by the scheduler become KILLED."""

        def __init__(self) -> None:
            self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id

        def _close(self, trial, status: str, note: str) -> None:
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
