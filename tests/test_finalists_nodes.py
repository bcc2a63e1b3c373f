"""The finalists' fine-tunes go where Ray has room: a real two-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`: a head with one CPU, a second node with two, each its own raylet) runs a search of the
digits CNN, whose finalists are fine-tuned as tasks on both nodes, the second node included, each finalist once in
the result (the SSH cluster test, tests/test_cluster_e2e.py, has one node); and a sweep's trial fine-tunes its
finalists in parallel inside its own placement group, in the bundles its env runners held. Each test has a Ray of
its own; about 40 s each on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_runs import tiny_search, tiny_sweep

from entropy_search.config import load_config
from entropy_search.sweep import load_sweep_config, run_sweep

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, train_digits_checkpoint) -> Path:
    return train_digits_checkpoint(tmp_path_factory.mktemp("baseline") / "digits_cnn.pt", epochs=3)


@pytest.fixture
def two_nodes():
    """A head node (1 CPU) and a worker node (2 CPUs), joined by this process; shut down after the test."""
    assert not ray.is_initialized(), "another Ray runs in this process"
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    cluster.wait_for_nodes()
    try:
        yield {"head": cluster.head_node.node_id, "worker": worker.node_id}
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_finalists_are_fine_tuned_on_the_second_node(two_nodes, checkpoint, tmp_path: Path):
    from entropy_search.search import run_search  # deferred: RLlib takes seconds to import

    config = load_config(tiny_search(tmp_path / "run", checkpoint, **{"finetune.epochs": 3,
                                                                       "resources.num_env_runners": 1}))
    result = run_search(config, progress=False)
    assert result["cost"]["finetunes_at_once"] == 3  # the cluster's 3 CPUs, one per fine-tune
    finals = [res["final"] for res in result["baselines"].values() if res.get("final")] + result["top_k"]
    labels = [final["label"] for final in finals]
    assert len(labels) == len(set(labels)) >= 3
    nodes = {final["finetuned_on"]["node_id"] for final in finals}
    assert two_nodes["worker"] in nodes and nodes <= {two_nodes["head"], two_nodes["worker"]}


@pytest.fixture
def three_cpus():
    """A local Ray with 3 logical CPUs: a trial of half a CPU and two env runners of one CPU each fits."""
    assert not ray.is_initialized(), "another Ray runs in this process"
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def test_a_sweep_trial_fine_tunes_its_finalists_in_its_placement_group(three_cpus, checkpoint, store,
                                                                       no_default_store, tmp_path: Path):
    data = tiny_sweep("in-group", tmp_path / "sweeps", checkpoint, store,
                      resources={"cpus_per_trial": 0.5, "num_env_runners": 2, "cpus_per_env_runner": 1},
                      axes={"seed": [0]}, max_concurrent_trials=1, mlflow={"tracking_uri": store, "log_model": False})
    data["base"]["selection"] = {"method": "full"}  # every finalist fine-tuned, after the env runners stopped
    sweep = load_sweep_config(data)
    result = run_sweep(sweep, verbose=0)
    assert result["status"] == "FINISHED" and result["failed"] == 0
    (trial,) = [p for p in Path(sweep.sweep_dir).iterdir() if (p / "search" / "result.json").exists()]
    res = json.loads((trial / "search" / "result.json").read_text())
    assert res["cost"]["finetunes_at_once"] == 2  # the two env-runner bundles, after the runners stopped
    finals = [r["final"] for r in res["baselines"].values() if r.get("final")] + res["top_k"]
    assert all(final["finetuned_on"]["ray_task"] for final in finals)
    assert len({final["label"] for final in finals}) == len(finals)
