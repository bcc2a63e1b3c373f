"""Ray Tune sweeps tracked in MLflow (`entropy_search.sweep.runner`, `.trainable`): a 2-trial sweep on the
digits CNN checked against its result files, resume without duplicate runs, crashed and interrupted trials.
The sweep's schema and its trials' configs are tested in tests/test_sweep_schema.py.

One local Ray instance (2 CPUs) and one temporary MLflow store serve the module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tiny_runs import tiny_sweep

from entropy_search import load_model
from entropy_search.data import load_data
from entropy_search.errors import ConfigError
from entropy_search.jsonio import read_jsonl
from entropy_search.problem import count_macs, load_checkpoint
from entropy_search.summary import flatten, read_candidate_table
from entropy_search.sweep import load_sweep_config, run_sweep
from entropy_search.train import evaluate

ray = pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")

from entropy_search import tracking  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, train_digits_checkpoint) -> Path:
    """A digits CNN trained for a few epochs (seconds), saved like `entropy-search train` does."""
    return train_digits_checkpoint(tmp_path_factory.mktemp("baseline") / "digits_cnn.pt", epochs=3)


pytestmark = pytest.mark.usefixtures("no_default_store")


def child_runs(store: str, result: dict) -> list:
    return tracking.trial_runs(tracking.client(store), result["experiment_id"], result["parent_run_id"])


def check_logged_model(mlclient, experiment_id: str, run, out: Path, res: dict, baseline: Path) -> None:
    """The trial's logged model is the delivered network (`best_pruned.pt`: same outputs), and its params, its
    metric and the run's unprefixed metrics are that network's own figures, measured here again: its MACs
    counted, its channels read off its layers, its test accuracy evaluated."""
    run_id, metrics = run.info.run_id, run.data.metrics
    (logged,) = mlclient.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
    model = mlflow.pytorch.load_model(logged.artifact_location)  # a torch.export program: batch-dynamic
    delivered = load_model(out / "best_pruned.pt")
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(model(x), delivered(x))
    example = load_checkpoint(baseline).example_input()
    macs = count_macs(delivered, example)
    dropped = json.loads(logged.params["dropped_blocks"])
    assert dropped == res["delivered"]["dropped_blocks"] and metrics["blocks_kept"] == 1 - len(dropped)
    assert all(isinstance(delivered.get_submodule(name), torch.nn.Identity) for name in dropped)
    # a group inside a dropped block is recorded whole: its layers are gone
    kept = [g["channels"] if g["name"].startswith(tuple(f"{name}." for name in dropped))
            else delivered.get_submodule(g["name"]).out_channels for g in res["groups"]]
    accuracy = evaluate(delivered, load_data("digits").test)
    assert logged.params["delivered"] == run.data.tags[tracking.DELIVERED_TAG] == res["delivered"]["label"]
    assert int(logged.params["macs"]) == macs == metrics["macs"]
    assert float(logged.params["macs_ratio"]) == pytest.approx(macs / count_macs(load_model(baseline), example))
    assert float(logged.params["macs_ratio"]) == pytest.approx(metrics["macs_ratio"])
    assert json.loads(logged.params["kept_channels"]) == kept
    (metric,) = [m for m in logged.metrics if m.key == "model_test_accuracy"]
    assert metric.value == pytest.approx(accuracy) == pytest.approx(metrics["test_accuracy"])


def test_two_trial_sweep_is_tracked_and_consistent_with_its_results(ray_local, checkpoint, store, tmp_path):
    sweep = load_sweep_config(tiny_sweep("two", tmp_path / "sweeps", checkpoint, store))
    result = run_sweep(sweep, verbose=0)
    assert result["status"] == "FINISHED" and result["failed"] == 0 and not result["interrupted"]
    mlclient = tracking.client(store)
    parent = mlclient.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags[tracking.ROLE_TAG] == "sweep"
    assert parent.data.params["axes.search.reward"] == json.dumps({"grid": ["entropy", "accuracy"]})
    assert {"summary.csv", "summary.md", "summary.json", "comparison.png"} <= {
        a.path for a in mlclient.list_artifacts(parent.info.run_id)}
    runs = child_runs(store, result)
    assert len(runs) == 2
    assert {r.data.params["search.reward"] for r in runs} == {"entropy", "accuracy"}

    for run in runs:
        run_id, data = run.info.run_id, run.data
        assert run.info.status == "FINISHED"
        assert data.tags["mlflow.parentRunId"] == parent.info.run_id
        for tag in ("env.git_commit", "env.package_version", "env.ray", "env.torch", "env.mlflow", "hardware"):
            assert data.tags.get(tag), tag
        out = Path(sweep.sweep_dir) / data.tags[tracking.TRIAL_NAME_TAG] / "search"
        res = json.loads((out / "result.json").read_text())
        # params = the trial's fully resolved config, flattened
        assert data.params == flatten(res["config"])
        assert res["config"]["output"]["dir"] == str(out)
        # per-iteration metrics, one point per iteration
        for key in ("reward_mean", "reward_max", "best_macs_ratio", "best_params_ratio", "best_entropy",
                    "best_accuracy", "candidates", "candidates_per_second"):
            history = mlclient.get_metric_history(run_id, key)
            assert [m.step for m in history] == [1, 2], key
        # the candidate table = every candidate of the search; its best row = the logged best
        dl = tmp_path / run_id
        rows = read_candidate_table(mlclient.download_artifacts(run_id, "candidates.csv", str(dl)))
        jsonl = read_jsonl(out / "candidates.jsonl")
        assert len(rows) == len(jsonl) == res["cost"]["candidates"] == data.metrics["candidates"] > 0
        best_row = max(rows, key=lambda r: r["reward"])
        assert data.metrics["best_macs_ratio"] == pytest.approx(best_row["macs_ratio"])
        assert data.metrics["best_params_ratio"] == pytest.approx(best_row["params_ratio"])
        assert data.metrics["best_reward"] == pytest.approx(best_row["reward"]) == pytest.approx(
            data.metrics["agent_reward"])
        assert best_row["kept_channels"] == res["agent"]["kept_channels"]
        # final metrics = the result file: unprefixed the delivered network's, agent_* the agent's own pick's
        delivered = res["delivered"]
        assert data.tags[tracking.DELIVERED_TAG] == delivered["label"] == res["selection"]["winner"]
        assert data.metrics["macs_ratio"] == pytest.approx(delivered["macs_ratio"])
        assert data.metrics["test_accuracy"] == pytest.approx(delivered["test_accuracy_after_finetune"])
        assert data.metrics["agent_macs_ratio"] == pytest.approx(res["agent"]["macs_ratio"])
        assert data.metrics["agent_test_accuracy"] == pytest.approx(res["agent"]["test_accuracy_after_finetune"])
        assert data.metrics["uniform_test_accuracy"] == pytest.approx(
            res["baselines"]["uniform"]["final"]["test_accuracy_after_finetune"])
        policy = json.loads(Path(mlclient.download_artifacts(run_id, "policy.json", str(dl))).read_text())
        assert policy["policy"] == res["policy"] == delivered["policy"] and policy["delivered"] == delivered["label"]
        assert policy["agent"]["policy"] == res["agent_policy"]
        assert {"candidates.csv", "policy.json", "scatter.png", "search"} <= {
            a.path for a in mlclient.list_artifacts(run_id)}
        check_logged_model(mlclient, result["experiment_id"], run, out, res, checkpoint)

    # the printed/logged summary comes from MLflow and matches the runs
    assert len(result["rows"]) == 2 and all(r["status"] == "FINISHED" for r in result["rows"])
    for row in result["rows"]:
        assert row["trial"] in result["table"]
    from entropy_search.sweep import report

    rep = report("two", tracking_uri=store, out=tmp_path / "cmp.png")
    assert rep["parent_run_id"] == parent.info.run_id and rep["table"] == result["table"]
    assert (tmp_path / "cmp.png").stat().st_size > 1000

    # resuming a finished sweep runs nothing again and creates no run
    before = {r.info.run_id: len(mlclient.get_metric_history(r.info.run_id, "best_reward")) for r in runs}
    again = run_sweep(sweep, resume=True, verbose=0)
    assert again["parent_run_id"] == parent.info.run_id
    after = child_runs(store, again)
    assert {r.info.run_id: len(mlclient.get_metric_history(r.info.run_id, "best_reward")) for r in after} == before
    assert len(tracking.trial_runs(mlclient, result["experiment_id"], parent.info.run_id)) == 2
    # a fresh start over it is refused without --overwrite
    with pytest.raises(ConfigError, match="--resume"):
        run_sweep(sweep, verbose=0)


def test_crashed_trial_is_failed_and_resume_does_not_duplicate(ray_local, checkpoint, store, tmp_path):
    """A trial that raises (a measured layer that does not exist) leaves a FAILED run with the reason;
    --resume --retry-failed runs it again in the same run, not in a new one."""
    data = tiny_sweep("crash", tmp_path / "sweeps", checkpoint, store,
                      axes={"search.entropy.layers": [["no_such_layer"]]})
    sweep = load_sweep_config(data)
    result = run_sweep(sweep, verbose=0)
    assert result["failed"] == 1 and result["errors"] == 1 and result["status"] == "FAILED"
    (failed,) = child_runs(store, result)
    assert failed.info.status == "FAILED"
    assert "no_such_layer" in failed.data.tags[tracking.STATUS_NOTE_TAG]
    assert tracking.client(store).get_run(result["parent_run_id"]).info.status == "FAILED"

    again = run_sweep(sweep, resume=True, retry_failed=True, verbose=0)
    assert again["parent_run_id"] == result["parent_run_id"] and again["failed"] == 1
    (rerun,) = child_runs(store, again)
    assert rerun.info.run_id == failed.info.run_id and rerun.info.status == "FAILED"
    assert rerun.data.tags["entropy_search.restarts"] == "1"


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_duplicate_runs(checkpoint, store, tmp_path):
    """Ctrl-C during the second of two sequential trials: the first run stays FINISHED, the second is
    KILLED; --resume finishes the second in its own run and leaves the first alone."""
    data = tiny_sweep("interrupt", tmp_path / "sweeps", checkpoint, store, max_concurrent_trials=1)
    data["base"]["stop"] = {"iterations": 30, "patience": None}  # all 30, whatever the rewards
    data["base"]["baselines"] = {"enabled": False}
    data["base"]["finetune"] = {"epochs": 0}
    data["mlflow"]["log_model"] = False
    data["resources"]["num_cpus"] = 2
    path = tmp_path / "interrupt.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen([sys.executable, "-m", "entropy_search.cli", "sweep", str(path), "--quiet"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "RAY_ADDRESS": ""})
    mlclient = tracking.client(store)
    second = None
    try:
        while proc.poll() is None:  # waits on the sweep's progress, however slow the machine (pytest-timeout)
            parent = tracking.find_sweep_run(mlclient, name="interrupt")
            if parent is not None:
                runs = tracking.trial_runs(mlclient, parent.info.experiment_id, parent.info.run_id)
                running = [r for r in runs if r.info.status == "RUNNING"
                           and mlclient.get_metric_history(r.info.run_id, "best_reward")]
                if len(runs) == 2 and running:
                    second = running[0]
                    break
            time.sleep(1)
        assert second is not None, "the second trial never started"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out[-3000:]
    runs = {r.info.run_id: r for r in tracking.trial_runs(mlclient, parent.info.experiment_id, parent.info.run_id)}
    assert runs[second.info.run_id].info.status == "KILLED"
    first = next(r for r in runs.values() if r.info.run_id != second.info.run_id)
    assert first.info.status == "FINISHED"
    first_points = len(mlclient.get_metric_history(first.info.run_id, "best_reward"))

    result = run_sweep(load_sweep_config(path), resume=True, verbose=0)
    assert result["status"] == "FINISHED" and result["parent_run_id"] == parent.info.run_id
    after = {r.info.run_id: r for r in child_runs(store, result)}
    assert set(after) == set(runs)  # no new run
    assert all(r.info.status == "FINISHED" for r in after.values())
    assert len(mlclient.get_metric_history(first.info.run_id, "best_reward")) == first_points
    assert after[second.info.run_id].data.metrics["iteration"] == 30
