"""bench_quality, the quality tables' runner: one row per method of a finished search (with each network's latency
timed against the unpruned one), tables of mean ± std over seeds with the gap to uniform pruning, the time to the
delivered network and the gap to the best of the peers; a second run skips every row already written. About 10 s
(a digits CNN trained for one epoch, and a few dozen batch-1 forwards)."""

from __future__ import annotations

import argparse
import json

import pytest
from bench_scripts import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("bench_quality")


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory, train_digits_checkpoint):
    return train_digits_checkpoint(tmp_path_factory.mktemp("quality") / "digits.pt", 1)


def network(label: str, counts: list[int], after: float) -> dict:
    return {"label": label, "kept_channels": counts, "macs_ratio": 0.5, "params_ratio": 0.5, "heldout_accuracy": 0.4,
            "test_accuracy_before_finetune": 0.3, "test_accuracy_after_finetune": after,
            "heldout_accuracy_after_finetune": after, "finetune_epochs": 3, "finetune_seconds": 20.0}


def test_a_finished_search_gives_one_row_per_method_with_its_measured_latency(bench, digits_checkpoint):
    space = bench.baseline_space({"config": {"model": {"checkpoint": str(digits_checkpoint)},
                                             "search": {"round_to": 1}}})
    full = [g.channels for g in space.groups]
    half = [max(1, c // 2) for c in full]
    result = {
        "config": {"model": {"checkpoint": str(digits_checkpoint)}, "search": {"round_to": 1}},
        "base": {"test_accuracy": 0.95},
        "cost": {"search_seconds": 30.0, "total_seconds": 100.0, "iterations": 12, "stopped_by": "patience",
                 "evaluations": 192, "finetunes_at_once": 2},
        "agent": network("top1", half, 0.90), "delivered": network("uniform", half, 0.92),
        "baselines": {"uniform": {"final": network("uniform", half, 0.92), "seconds": 0.1},
                      "random": {"final": network("random", half, 0.88), "seconds": 8.0},
                      "tp_isomorphic": {"final": network("tp_isomorphic", half, 0.91), "seconds": 1.0,
                                        "best": {"within_tolerance": False}},
                      "tp_taylor": {"best": None, "error": "no ratio meets the budget"}},
    }
    args = argparse.Namespace(preset="digits")
    rows = bench.search_rows(args, "macs:0.5", "agreement", 0, result, 123.0)
    assert [r["method"] for r in rows] == ["delivered", "agent", "random", "uniform", "tp_isomorphic"]
    by = {r["method"]: r for r in rows}
    for row in rows:
        assert row["latency_ratio"] > 0 and row["unpruned_latency_ms"] > 0 and row["kept_channels"] == half
        assert row["budget"] == "macs:0.5" and row["seed"] == 0 and row["reward"] == "agreement"
    assert by["delivered"]["wall_seconds"] == 123.0 and by["delivered"]["stopped_by"] == "patience"
    assert "wall_seconds" not in by["uniform"]
    assert by["delivered"]["found_seconds"] == 30.0 and by["random"]["found_seconds"] == 8.0
    assert by["tp_isomorphic"]["within_tolerance"] is False and by["uniform"]["within_tolerance"] is True


def row(method: str, seed: int, after: float, **extra) -> dict:
    return {"preset": "fashion30", "budget": "macs:0.1", "reward": None if method in ("uniform_cli", "fastnas")
            else "agreement", "seed": seed, "method": method, "label": extra.pop("label", method), "macs_ratio": 0.099,
            "latency_ratio": 0.4, "unpruned_latency_ms": 1.4, "blocks_kept": 7, "blocks": 7, "test_before": 0.1,
            "test_after": after, "found_seconds": 5.0, "finetune_seconds": 60.0, "within_tolerance": True,
            "unpruned_test": 0.9348, "finetune_epochs": 3, **extra}


def test_the_tables_show_mean_and_spread_the_gap_to_uniform_and_the_time_to_the_delivered_network(bench):
    rows = []
    for seed, (uniform, delivered, taylor) in enumerate(((0.910, 0.915, 0.913), (0.906, 0.916, 0.912))):
        rows += [row("delivered", seed, delivered, label="top1", wall_seconds=600.0), row("uniform", seed, uniform),
                 row("agent", seed, delivered, label="top1"), row("tp_taylor", seed, taylor),
                 row("uniform_cli", seed, uniform, wall_seconds=60.0 * (seed + 1)), row("fastnas", seed, 0.90)]
    lines = bench.report(rows, "fashion30").splitlines()
    assert "fashion30, macs:0.1 (10.0x fewer MACs), reward agreement, seeds [0, 1]" in lines[1]
    assert "3 epochs (10% of the baseline's 30)" in lines[1]
    table = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ") and "---" not in line}
    delivered = table["delivered by the search (the final stage's pick) (top1, top1)"]
    assert "| **91.55 ± 0.07** | +0.50, +1.00 |" in delivered
    assert table["uniform pruning"].startswith("| uniform pruning | 2 | 0.099 | 0.400 | 7/7 | 10.00 ± 0.00 |")
    assert "| **90.00 ± 0.00** | -1.00, -0.60 |" in table[bench.DESCRIPTIONS["fastnas"]]
    assert bench.DESCRIPTIONS["random"] not in table and bench.DESCRIPTIONS["tp_magnitude"] not in table
    assert "seed 0: 600 s against 60 s (10.0x); seed 1: 600 s against 120 s (5.0x)" in lines[-2]
    # the best of the peers is Torch-Pruning's Taylor recipe (91.25%), 0.30 points below the delivered 91.55%
    assert lines[-1].endswith("tp_taylor +0.30")


def test_a_second_run_skips_every_row_already_written(bench, tmp_path, monkeypatch):
    calls = []

    def fake_search(args, budget, reward, seed):
        calls.append(("search", budget, seed))
        folder = bench.run_dir(args.runs, budget, reward, seed)
        folder.mkdir(parents=True)
        result = {"baselines": {"uniform": {"final": {"keep": [0.3], "finetune_epochs": 3}}}}
        (folder / "result.json").write_text(json.dumps(result))
        return result, 100.0

    def fake_rows(args, budget, reward, seed, result, wall):
        return [row("delivered", seed, 0.9, budget=budget, reward=reward)]

    def fake_alone(args, budget, seed, uniform):
        calls.append(("uniform_cli", budget, seed))
        if seed == 1:
            raise KeyboardInterrupt  # an interruption after seed 1's search: what finished is kept
        return row("uniform_cli", seed, 0.9, budget=budget)

    monkeypatch.setattr(bench, "run_search", fake_search)
    monkeypatch.setattr(bench, "search_rows", fake_rows)
    monkeypatch.setattr(bench, "uniform_cli_row", fake_alone)
    args = argparse.Namespace(budgets=["macs:0.1"], seeds=[0, 1], rewards=["agreement"], runs=tmp_path / "runs",
                              rows=tmp_path / "rows.jsonl", methods=["search", "uniform_cli"])
    rows: list[dict] = []
    with pytest.raises(KeyboardInterrupt):
        bench.run_all(args, rows)
    assert calls == [("search", "macs:0.1", 0), ("uniform_cli", "macs:0.1", 0), ("search", "macs:0.1", 1),
                     ("uniform_cli", "macs:0.1", 1)]
    written = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [(r["method"], r["seed"]) for r in written] == [("delivered", 0), ("uniform_cli", 0), ("delivered", 1)]
    calls.clear()
    monkeypatch.setattr(bench, "uniform_cli_row", lambda *a: (calls.append("uniform_cli 1"), row("uniform_cli", 1, 0.9))[1])
    bench.run_all(args, written)
    assert calls == ["uniform_cli 1"]  # only what the interruption left


def test_budgets_are_macs_or_latency_ratios(bench):
    assert bench.budget_overrides("macs:0.1") == ["search.budget=macs", "search.flops_target=0.1"]
    assert bench.budget_overrides("latency:0.4") == ["search.budget=latency", "search.latency_target=0.4"]
    with pytest.raises(SystemExit, match="macs:RATIO or latency:RATIO"):
        bench.parse_budget("flops:0.1")


def test_the_best_of_the_others_counts_only_networks_at_the_same_budget(bench):
    """A peer outside the budget's 3% (FastNAS, steered by FLOPs, over a latency budget) is in the table but is not
    the "best of the others" the delivered network is held to. Instant."""
    def row(method, seed, after, within=True):
        return {"method": method, "seed": seed, "test_after": after, "within_tolerance": within}

    runs = [row("delivered", 0, 92.0), row("uniform", 0, 91.9), row("tp_taylor", 0, 91.5),
            row("fastnas", 0, 93.0, within=False)]
    assert bench.best_of_others(runs) == [("uniform", pytest.approx(0.1))]
    assert bench.best_of_others([*runs[:3], row("fastnas", 0, 93.0)]) == [("fastnas", pytest.approx(-1.0))]


def test_a_budget_fastnas_cannot_reach_is_a_row_that_says_so(bench, monkeypatch):
    """FastNAS's FLOPs percentage below its smallest network (Model Optimizer's ValueError) bounds the bisection from
    below; when no percentage it accepts meets the budget, the row says why, has no accuracy and is not "the best of
    the others". A fake FastNAS whose networks cost 0.40 + percent/1000 of the unpruned one; instant."""
    from types import SimpleNamespace

    fastnas = load_bench("fastnas_peer")
    tried = []

    def fake_at(problem, percent, checkpoint):
        tried.append(percent)
        if percent < 2.0:
            raise ValueError("Profiling ...\nNOT all constraints can be satisfied within the search space, see above!")
        return SimpleNamespace(percent=percent), 1.0

    monkeypatch.setattr(fastnas, "fastnas_at", fake_at)
    space = SimpleNamespace(counts_of=lambda network: [network.percent])
    problem = SimpleNamespace(budget=SimpleNamespace(target=0.33, base_cost=1.0,
                                                     cost=lambda counts: 0.40 + counts[0] / 1000), space=space)
    found = fastnas.fastnas_peer(problem, None, steps=8)
    assert found["network"] is None and "over its 0.330" in found["unreachable"]
    assert found["cost_ratio"] == pytest.approx(0.40 + min(p for p in tried if p >= 2.0) / 1000)
    assert any(p < 2.0 for p in tried) and len(tried) == 8
    problem.budget.target = 0.45  # reachable: the bisection finds a percentage within 1% below the target
    found = fastnas.fastnas_peer(problem, None)
    assert found["network"] is not None and 0.45 * 0.99 <= found["cost_ratio"] <= 0.45

    unreachable = row("fastnas", 0, None, within_tolerance=False, unreachable="its smallest network costs 0.4",
                      macs_ratio=None, latency_ratio=None, blocks_kept=None)
    runs = [row("delivered", 0, 0.92), row("uniform", 0, 0.91), unreachable]
    table = [line for line in bench.report(runs, "fashion30").splitlines() if bench.DESCRIPTIONS["fastnas"] in line]
    assert "(cannot reach the budget at seed 0: its smallest network costs 0.4)" in table[0]
    assert "| - | - | - |" in table[0] and "**- **" not in table[0]
    assert bench.best_of_others(runs) == [("uniform", pytest.approx(0.01))]
