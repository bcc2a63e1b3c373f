"""bench/bench_headroom.py's fine-tune queue: which candidates a headroom study fine-tunes, and its shards."""

from __future__ import annotations

import numpy as np
from bench_scripts import load_bench


def test_the_queue_holds_uniform_per_seed_the_best_by_reward_and_others_and_its_shards_split_it():
    bench = load_bench("bench_headroom")
    drawn = [{"reward": r, "id": i} for i, r in enumerate([0.5, 0.9, 0.1, 0.7, 0.3, 0.8])]
    queue = bench.finetune_queue({"id": "u"}, drawn, top=2, random=3, uniform_seeds=2, seed=5,
                                 rng=np.random.default_rng(0))
    assert [(k, r["id"], s) for k, r, s in queue[:2]] == [("uniform", "u", 5), ("uniform", "u", 6)]
    kinds = [k for k, _, _ in queue[2:]]
    assert kinds == ["top", "random", "top", "random", "random"]
    assert [r["id"] for k, r, _ in queue if k == "top"] == [1, 5]  # rewards 0.9 and 0.8
    randoms = [r["id"] for k, r, _ in queue if k == "random"]
    assert len(set(randoms)) == 3 and not set(randoms) & {1, 5}
    assert all(s == 5 for k, _, s in queue if k != "uniform")
    shards = [queue[k::3] for k in range(3)]
    assert sorted(map(id, sum(shards, []))) == sorted(map(id, queue))


def test_the_report_merges_shards_and_compares_with_uniform_s_mean():
    bench = load_bench("bench_headroom")
    config = {"model": {"name": "m", "checkpoint": "c"}, "data": {"name": "d"}, "search": {"flops_target": 0.1},
              "finetune": {"epochs": 5}}

    def row(kind, test, held, reward=0.1):
        return {"kind": kind, "reward": reward, "macs_ratio": 0.099, "test_accuracy_after_finetune": test,
                "heldout_accuracy_after_finetune": held}

    shards = [{"config": config, "base_test_accuracy": 0.93, "reward": "agreement", "candidates": 4,
               "environment": {"cuda": "none"}, "rows": [row("uniform", 0.910, 0.920), row("top", 0.918, 0.921, 0.2)]},
              {"config": config, "rows": [row("uniform", 0.920, 0.924), row("random", 0.921, 0.930)],
               "stopped_by_deadline": 2}]
    text = bench.report(shards)
    assert "| uniform | 2 |" in text and "| top | 1 |" in text and "| random | 1 |" in text
    assert "best candidate on test minus uniform's mean: +0.60 points (random)" in text
    assert "candidates >= 0.5 above uniform on test: 1 of 2" in text
    assert "stopped by --deadline with 2 fine-tunes left" in text
