"""MLflow tracking (`entropy_search.tracking`) without Ray: runs found again instead of duplicated,
params/metrics/artifacts of a trial, the sweep's summary read back from MLflow. One temporary sqlite store
serves the module. The pure tables are tested in tests/test_summary.py, the store's URI in tests/test_store.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

mlflow = pytest.importorskip("mlflow")

from entropy_search import load_model, tracking  # noqa: E402
from entropy_search.config import load_config  # noqa: E402
from entropy_search.summary import flatten, format_table, read_candidate_table  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_default_store")


@pytest.fixture(scope="module")
def fake_search(tmp_path_factory) -> tuple[dict, Path]:
    """What `run_search` leaves behind, without running it: result.json, candidates.jsonl, a model file."""
    from entropy_search.models import create_model
    from entropy_search.problem import save_checkpoint

    out = tmp_path_factory.mktemp("search")
    torch.manual_seed(0)
    model = create_model("digits_cnn", num_classes=10, in_channels=1).eval()
    ckpt = out / "baseline.pt"
    save_checkpoint(ckpt, model, model_name="digits_cnn", num_classes=10, in_channels=1, image_size=8, data="digits",
                    config={"seed": 0, "heldout_fraction": 0.1}, metrics={"test_acc": 0.9})
    save_checkpoint(out / "best_pruned.pt", model, model_name="digits_cnn", num_classes=10, in_channels=1,
                    image_size=8, data="digits")
    config = load_config({"model": {"checkpoint": str(ckpt)}, "search": {"flops_target": 0.5},
                          "output": {"dir": str(out)}})
    records = []
    for i in range(12):
        records.append({"id": i, "iteration": 1 + i // 4, "reward": -1.0 + 0.05 * ((i * 7) % 12),
                        "macs_ratio": 0.3 + 0.015 * i, "params_ratio": 0.4 + 0.01 * i, "macs": 1000 + i,
                        "params": 500 + i, "entropy": 1.0 - 0.05 * ((i * 7) % 12), "accuracy": 0.5 + 0.03 * i,
                        "cache_hit": i == 11, "kept_channels": [8 + i % 3, 16], "keep": [0.5, 1.0]})
    with open(out / "candidates.jsonl", "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    best = max(records, key=lambda r: r["reward"])
    final = {"reward": best["reward"], "macs_ratio": best["macs_ratio"], "params_ratio": best["params_ratio"],
             "macs": best["macs"], "params": best["params"], "entropy": best["entropy"],
             "heldout_accuracy": best["accuracy"], "test_accuracy_before_finetune": 0.7,
             "test_accuracy_after_finetune": 0.8, "kept_channels": best["kept_channels"], "keep": best["keep"],
             "policy": {"conv1": 0.5, "conv2": 1.0}, "label": "top1"}
    uniform = records[3]  # the final stage delivered uniform pruning, not the agent's pick
    delivered = {"label": "uniform", "reward": -0.9, "macs_ratio": uniform["macs_ratio"],
                 "params_ratio": uniform["params_ratio"], "macs": uniform["macs"], "params": uniform["params"],
                 "heldout_accuracy": uniform["accuracy"], "test_accuracy_before_finetune": 0.6,
                 "test_accuracy_after_finetune": 0.75, "kept_channels": uniform["kept_channels"],
                 "keep": uniform["keep"], "policy": {"conv1": 0.6, "conv2": 0.6}}
    result = {
        "config": config.to_dict(),
        "groups": [{"name": "conv1"}, {"name": "conv2"}],
        "base": {"macs": 2000, "params": 1000, "test_accuracy": 0.9, "heldout_accuracy": 0.91, "entropy": 2.0},
        "policy": delivered["policy"], "delivered": delivered, "agent_policy": final["policy"], "agent": final,
        "top_k": [final],
        "baselines": {
            "uniform": {"best": {**records[3], "reward": -0.9}, "final": {"test_accuracy_after_finetune": 0.75},
                        "evaluations": 1},
            "random": {"best": records[5], "final": {"test_accuracy_after_finetune": 0.7}, "evaluations": 11},
        },
        "cost": {"iterations": 3, "candidates": 12, "evaluations": 11, "cache_hits": 1, "search_seconds": 2.0,
                 "candidates_per_second": 6.0, "total_seconds": 30.0},
        "history": [{"iteration": 3, "best_reward": best["reward"]}],
        "files": {"pytorch": str(out / "best_pruned.pt")},
        "selection": {"enabled": True, "method": "halving", "winner": "uniform", "rungs": [
            {"steps": 30, "heldout_accuracy": {"uniform": 0.5, "top1": 0.6, "random": 0.4}},
            {"steps": 90, "heldout_accuracy": {"uniform": 0.7, "top1": 0.65}}]},
    }
    (out / "result.json").write_text(json.dumps(result))
    config.save(out / "config.yaml")
    return result, out


def test_trial_run_is_found_again_and_logs_everything(store, fake_search):
    result, out = fake_search
    mlclient = tracking.client(store)
    exp = tracking.get_or_create_experiment(mlclient, "tracking-test", store)
    assert tracking.get_or_create_experiment(mlclient, "tracking-test", store) == exp
    # local stores keep artifacts next to the database, not in the current directory
    assert mlclient.get_experiment(exp).artifact_location.startswith(Path(store[len("sqlite:///"):]).parent.as_uri())
    parent, reused = tracking.open_sweep_run(mlclient, exp, name="sw", sweep_dir="/tmp/sw", params={"p": "1"},
                                             tags={"t": "x"}, resume=False)
    assert not reused
    again, reused = tracking.open_sweep_run(mlclient, exp, name="sw", sweep_dir="/tmp/sw", params={"p": "1"},
                                            tags={}, resume=True)
    assert reused and again == parent

    def trial_run():
        return tracking.TrialRun(store, exp, parent, trial_id="abc_00000", trial_name="t00000-reward=entropy",
                                 sweep_name="sw", tags={"env.git_commit": "deadbeef"})

    run = trial_run()
    run_id = run.open(result["config"], {"search.reward": "entropy"})
    for it in (1, 2, 3):
        run.log_iteration({"iteration": it, "best_macs_ratio": 0.5 - 0.01 * it, "reward_mean": float("nan"),
                           "note": "skipped: not a number"})
    # a restarted trial finds its run: no second run
    second = trial_run()
    assert second.open(result["config"], {"search.reward": "entropy"}) == run_id
    assert second.previous_status == "RUNNING"
    final = second.log_result(result, out, log_model=True)
    assert os.environ["MLFLOW_TRACKING_URI"] == store  # logging the model left the fluent store as it was
    second.finish("FINISHED")

    runs = tracking.trial_runs(mlclient, exp, parent)
    assert [r.info.run_id for r in runs] == [run_id]
    got = mlclient.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.tags["mlflow.parentRunId"] == parent and got.data.tags["env.git_commit"] == "deadbeef"
    assert got.data.tags["entropy_search.restarts"] == "1" and "hardware" in got.data.tags
    assert got.data.params == flatten(result["config"])
    history = mlclient.get_metric_history(run_id, "best_macs_ratio")
    assert [m.step for m in history] == [1, 2, 3]
    assert "reward_mean" not in got.data.metrics  # NaN is not logged
    # the final stage's rungs: each finalist's held-out accuracy at each rung's steps
    rungs = {key: [(m.step, m.value) for m in mlclient.get_metric_history(run_id, key)]
             for key in got.data.metrics if key.startswith("final_stage_heldout_accuracy_")}
    assert rungs == {"final_stage_heldout_accuracy_uniform": [(30, 0.5), (90, 0.7)],
                     "final_stage_heldout_accuracy_top1": [(30, 0.6), (90, 0.65)],
                     "final_stage_heldout_accuracy_random": [(30, 0.4)]}
    # unprefixed: the delivered network (uniform pruning here); the agent's own pick under agent_*
    assert got.data.tags[tracking.DELIVERED_TAG] == "uniform"
    assert got.data.metrics["test_accuracy"] == pytest.approx(0.75) == final["test_accuracy"]
    assert got.data.metrics["uniform_test_accuracy"] == pytest.approx(0.75)
    assert got.data.metrics["agent_test_accuracy"] == pytest.approx(0.8)
    assert got.data.metrics["macs_ratio"] == pytest.approx(result["delivered"]["macs_ratio"])
    artifacts = {a.path for a in mlclient.list_artifacts(run_id)}
    assert {"candidates.csv", "policy.json", "scatter.png", "search"} <= artifacts
    local = Path(mlclient.download_artifacts(run_id, "candidates.csv", str(out / "dl")))
    rows = read_candidate_table(local)
    assert len(rows) == 12 and rows[0]["kept_channels"] == [8, 16] and rows[11]["cache_hit"] is True
    best_row = max(rows, key=lambda r: r["reward"])
    assert best_row["macs_ratio"] == pytest.approx(got.data.metrics["agent_macs_ratio"])
    policy = json.loads(Path(mlclient.download_artifacts(run_id, "policy.json", str(out / "dl"))).read_text())
    assert policy["policy"] == result["policy"] and policy["delivered"] == "uniform"
    assert policy["agent"]["policy"] == result["agent_policy"] and policy["agent"]["macs_ratio"] == best_row["macs_ratio"]
    # the model: logged with mlflow.pytorch, an input example and a signature, loadable, same outputs
    models = mlclient.search_logged_models([exp], filter_string=f"source_run_id = '{run_id}'")
    assert len(models) == 1
    assert models[0].params["delivered"] == "uniform"
    assert float(models[0].params["macs_ratio"]) == pytest.approx(result["delivered"]["macs_ratio"])
    assert [m.value for m in models[0].metrics if m.key == "model_test_accuracy"] == [pytest.approx(0.75)]
    loaded = mlflow.pytorch.load_model(models[0].artifact_location)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x), load_model(out / "best_pruned.pt")(x))
    from urllib.parse import urlparse

    from mlflow.models import Model

    info = Model.load(Path(urlparse(models[0].artifact_location).path) / "MLmodel")
    assert info.signature is not None and info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] in ((-1, 1, 8, 8), [-1, 1, 8, 8])

    # the summary from MLflow, and a run left RUNNING by a dead process gets closed
    dead = trial_run()
    dead.trial_id, dead.trial_name = "abc_00001", "t00001-reward=accuracy"
    dead_id = dead.open(result["config"], {"search.reward": "accuracy"})
    assert tracking.close_unfinished_trials(mlclient, exp, parent, "FAILED", "died") == [dead_id]
    assert mlclient.get_run(dead_id).info.status == "FAILED"
    assert mlclient.get_run(dead_id).data.tags[tracking.STATUS_NOTE_TAG] == "died"
    rows, paths = tracking.log_sweep_summary(mlclient, exp, parent, out / "summary", title="sw")
    assert [r["status"] for r in rows] == ["FINISHED", "FAILED"]
    table = format_table(rows)
    assert "t00000-reward=entropy" in table and "80.00%" in table and "75.00%" in table
    assert {"summary.csv", "summary.md", "summary.json", "comparison.png"} <= {
        a.path for a in mlclient.list_artifacts(parent)}
    assert tracking.find_sweep_run(mlclient, name="sw").info.run_id == parent
    assert tracking.find_sweep_run(mlclient, sweep_dir="/tmp/sw").info.run_id == parent
    assert tracking.find_sweep_run(mlclient, name="nope") is None


def test_sweep_experiment_opens_as_model_training_with_its_trials_view_and_story(store, tmp_path):
    """What the MLflow UI reads: the experiment-kind tag, the sweep's saved runs view (its trials flat,
    FLOPs ratio and accuracy as columns, a FLOPs-vs-accuracy scatter) and the parent run's description
    (the plot artifact, a link to each trial's run); `ui` finds the latest sweep's pages. The browser
    test (tests/test_ui_browser.py) checks what MLflow makes of them."""
    from entropy_search.commands import ui
    from entropy_search.errors import EntropySearchError

    mlclient = tracking.client(store)
    old = mlclient.create_experiment("made-before-the-tag")  # an experiment of an older version
    assert tracking.get_or_create_experiment(mlclient, "made-before-the-tag", store) == old
    exp = tracking.get_or_create_experiment(mlclient, "story", store)
    for experiment_id in (old, exp):
        assert mlclient.get_experiment(experiment_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"

    parent, _ = tracking.open_sweep_run(mlclient, exp, name="story", sweep_dir=str(tmp_path / "story"), params={},
                                        tags={}, resume=False)
    key = tracking.SHARED_VIEW_PREFIX + tracking.sweep_view_key(parent)
    view = json.loads(mlclient.get_experiment(exp).tags[key])
    assert view["searchFilter"] == f"tags.`mlflow.parentRunId` = '{parent}'"
    # the delivered network first: which finalist, its MACs ratio, its test accuracy
    assert view["selectedColumns"][:3] == [f"tags.`{tracking.DELIVERED_TAG}`", "metrics.`macs_ratio`",
                                           "metrics.`test_accuracy`"]
    scatter = view["compareRunCharts"][0]
    assert scatter["type"] == "SCATTER" and (scatter["xaxis"]["key"], scatter["yaxis"]["key"]) == (
        "macs_ratio", "test_accuracy")

    trials = {}
    for name, (macs, acc) in {"t00000-reward=entropy": (0.49, 0.81), "t00001-reward=accuracy": (0.48, 0.88)}.items():
        run = mlclient.create_run(exp, run_name=name, tags={tracking.PARENT_TAG: parent, tracking.ROLE_TAG: "trial",
                                                            tracking.TRIAL_NAME_TAG: name})
        tracking.log_metrics(mlclient, run.info.run_id, {"macs_ratio": macs, "test_accuracy": acc})
        mlclient.set_terminated(run.info.run_id)
        trials[name] = run.info.run_id
    tracking.log_sweep_summary(mlclient, exp, parent, tmp_path / "summary", title="sweep story",
                               description="a story")
    note = mlclient.get_run(parent).data.tags[tracking.NOTE_TAG]
    links = tracking.sweep_links(exp, parent)
    assert note.startswith("a story\n") and f"({links['runs']})" in note
    assert f"(get-artifact?path=comparison.png&run_uuid={parent})" in note
    assert "comparison.png" in {a.path for a in mlclient.list_artifacts(parent)}
    for name, run_id in trials.items():
        assert f"[{name}]({tracking.run_link(exp, run_id)})" in note
    assert "81.00%" in note and "88.00%" in note

    # a sweep logged by an older version: `ui` saves its view and tells its story
    mlclient.delete_experiment_tag(exp, key)
    mlclient.set_tag(parent, tracking.NOTE_TAG, "a story")
    mlclient.set_terminated(parent)
    assert list(ui.sweep_pages(store).values()) == [links["runs"], links["parent"]]
    assert json.loads(mlclient.get_experiment(exp).tags[key]) == view
    assert mlclient.get_run(parent).data.tags[tracking.NOTE_TAG] == note.replace("a story", "sweep story", 1)
    assert list(ui.sweep_pages(store, "story").values()) == [links["runs"], links["parent"]]
    with pytest.raises(EntropySearchError, match="no sweep 'nope'"):
        ui.sweep_pages(store, "nope")
