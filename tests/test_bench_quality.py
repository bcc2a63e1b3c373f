"""bench_quality's report on hand-made result files: one row per method (the delivered network, the agent's pick,
random search, uniform pruning, each of Torch-Pruning's recipes), the time each took, and the fine-tune budget as a
share of the baseline's training; result files written before the recipes existed leave their rows out. Under 1 s."""

from __future__ import annotations

import argparse
import json

from bench_scripts import load_bench

from entropy_search.problem import PEER_RECIPES


def network(label: str, after: float, macs: float = 0.099) -> dict:
    return {"label": label, "macs_ratio": macs, "heldout_accuracy": 0.9, "test_accuracy_before_finetune": 0.5,
            "test_accuracy_after_finetune": after, "finetune_seconds": 120.0, "reward": 0.9}


def result(peers: bool) -> dict:
    baselines = {"uniform": {"best": {"accuracy": 0.91, "reward": 0.9}, "final": network("uniform", 0.912),
                             "seconds": 0.1},
                 "random": {"best": {"accuracy": 0.90, "reward": 0.8}, "final": network("random", 0.905),
                            "seconds": 30.0}}
    if peers:
        baselines.update({name: {"best": {"accuracy": 0.89, "reward": 0.85}, "final": network(name, 0.90),
                                 "seconds": 5.0} for name in PEER_RECIPES})
    rung = {"heldout_accuracy": {"uniform": 0.92, "top1": 0.921}, "p_value_vs_uniform": {"top1": 0.4}}
    if peers:  # a recipe more accurate on held-out images than uniform, delivered at a looser level
        rung["heldout_accuracy"]["tp_taylor"] = 0.925
        rung["p_value_vs_uniform"]["tp_taylor"] = 0.3
    return {"config": {"finetune": {"epochs": 3}}, "base": {"test_accuracy": 0.933}, "cost": {"search_seconds": 600.0},
            "agent": network("top1", 0.91), "top_k": [network("top1", 0.91)], "delivered": network("uniform", 0.912),
            "baselines": baselines, "selection": {"winner": "uniform", "finalists": list(rung["heldout_accuracy"]),
                                                  "rungs": [rung]}}


def test_one_row_per_method_with_its_time_and_the_fine_tune_budget(tmp_path):
    bench = load_bench("bench_quality")
    for seed, peers in ((0, True), (1, False)):
        folder = bench.run_dir(tmp_path, 0.1, "agreement", seed)
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps(result(peers)))
    args = argparse.Namespace(targets=[0.1], rewards=["agreement"], seeds=[0, 1], out=tmp_path, preset="fashion30",
                              levels=[0.2, 1.0])
    lines = bench.report(args).splitlines()
    assert "fashion30: flops_target 0.1 (10.0x), seeds [0, 1]" in lines[1]
    assert "3 fine-tune epochs of the baseline's 30 (10%)" in lines[1]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"candidate", "delivered", "agent", "random", "uniform", *PEER_RECIPES}
    assert rows["delivered"].endswith("| 600 | 120 |") and rows["uniform"].endswith("| 0 | 120 |")
    for name in PEER_RECIPES:  # only the newer file has them: one run each
        assert rows[name].startswith(f"| {name} | - | 1 | 0.099 |") and rows[name].endswith("| 90.00 ± 0.00 | 5 | 120 |")
    assert rows["uniform"].startswith("| uniform | - | 2 |")
    # replayed at other levels of the final stage: at 1.0 the recipe would have been delivered (-1.2 points)
    assert "0.2: uniform +0.00, uniform +0.00; 1: tp_taylor -1.20, top1 -0.20" in lines[-1]
