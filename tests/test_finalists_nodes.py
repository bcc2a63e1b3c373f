"""The finalists' fine-tunes go where a Ray cluster has room: a real two-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`: a head with one CPU, a second node with two, each its own raylet) runs a search of the
digits CNN; its finalists are fine-tuned as tasks on both nodes, the second node included, and each finalist enters
the result once. (The SSH cluster test, tests/test_cluster_e2e.py, has one node.) About 40 s on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_runs import tiny_search

from entropy_search.config import load_config

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = pytest.mark.slow


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


def test_finalists_are_fine_tuned_on_the_second_node(two_nodes, train_digits_checkpoint, tmp_path: Path):
    from entropy_search.search import run_search  # deferred: RLlib takes seconds to import

    checkpoint = train_digits_checkpoint(tmp_path / "digits_cnn.pt", epochs=3)
    config = load_config(tiny_search(tmp_path / "run", checkpoint, **{"finetune.epochs": 3,
                                                                       "resources.num_env_runners": 1}))
    result = run_search(config, progress=False)
    assert result["cost"]["finetunes_at_once"] == 3  # the cluster's 3 CPUs, one per fine-tune
    finals = [res["final"] for res in result["baselines"].values() if res.get("final")] + result["top_k"]
    labels = [final["label"] for final in finals]
    assert len(labels) == len(set(labels)) >= 3
    nodes = {final["finetuned_on"]["node_id"] for final in finals}
    assert two_nodes["worker"] in nodes and nodes <= {two_nodes["head"], two_nodes["worker"]}
