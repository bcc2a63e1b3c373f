"""Summaries as plain tables (`entropy_search.summary`), no MLflow: a search's result flattened into the
numbers tracked per trial, the candidate table, the sweep's summary table and its mean ± std over seeds."""

from __future__ import annotations

import csv
import json
import math

import pytest

from entropy_search.summary import (
    NETWORK_FIGURES,
    SUMMARY_COLUMNS,
    agent_pick,
    aggregate_rows,
    delivered_network,
    delivered_policy,
    final_metrics,
    finite,
    flatten,
    format_aggregate,
    format_table,
    numeric,
    policy_file,
    read_candidate_table,
    upgrade_metrics,
    write_candidate_table,
    write_summary,
)

AGENT = {"label": "top1", "policy": {"conv1": 0.5, "conv2": 1.0}, "reward": -1.2, "macs_ratio": 0.45,
         "params_ratio": 0.6, "macs": 900, "params": 600, "entropy": 1.2, "heldout_accuracy": 0.85,
         "test_accuracy_before_finetune": 0.7, "test_accuracy_after_finetune": 0.8, "kept_channels": [8, 16]}
DELIVERED = {"label": "uniform", "policy": {"conv1": 0.75, "conv2": 0.75}, "reward": -1.5, "macs_ratio": 0.49,
             "params_ratio": 0.55, "macs": 980, "params": 550, "entropy": 1.5, "heldout_accuracy": 0.8,
             "heldout_accuracy_after_finetune": 0.86, "test_accuracy_before_finetune": 0.72,
             "test_accuracy_after_finetune": 0.82, "kept_channels": [12, 12]}
RESULT = {
    "config": {"search": {"flops_target": 0.5}},
    "groups": [{"name": "conv1"}, {"name": "conv2"}],
    "policy": DELIVERED["policy"],
    "delivered": DELIVERED,
    "agent_policy": AGENT["policy"],
    "agent": AGENT,
    "base": {"macs": 2000, "params": 1000, "test_accuracy": 0.9, "heldout_accuracy": 0.91, "entropy": 2.0},
    "baselines": {
        "uniform": {"best": {"reward": -1.5, "macs_ratio": 0.49, "accuracy": 0.8}, "evaluations": 1,
                    "final": {"test_accuracy_after_finetune": 0.82}},
        "random": {"best": {"reward": -1.3, "macs_ratio": 0.47, "accuracy": None}, "evaluations": 11},
    },
    "proxy": {"candidates": 12, "entropy_reward_vs_accuracy": 0.4, "reward_vs_accuracy": None},
    "cost": {"iterations": 3, "candidates": 12, "evaluations": 11, "cache_hits": 1, "search_seconds": 2.0,
             "candidates_per_second": 6.0, "total_seconds": float("nan")},
}
#: The same search as result files wrote it before the delivered network took the unprefixed names.
OLD_RESULT = {k: v for k, v in RESULT.items() if k not in ("policy", "agent_policy", "agent")}
OLD_RESULT.update(best=AGENT, best_policy=AGENT["policy"], delivered_policy=DELIVERED["policy"])


def test_flatten():
    flat = flatten({"a": {"b": 1, "c": [1, 2], "d": None, "e": {}}, "f": "x"})
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "a.d": "None", "a.e": "{}", "f": "x"}
    assert flatten({"a": {"b": True}}, "base.") == {"base.a.b": "True"}


def test_numbers_are_finite_floats_only():
    assert finite(1) and finite(0.5) and not finite(True) and not finite(float("nan")) and not finite(None)
    assert not finite(float("inf")) and not finite("1")
    assert numeric({"a": 1, "b": float("nan"), "c": None, "d": "x", "e": True, "f": 2.5}) == {"a": 1.0, "f": 2.5}


def test_final_metrics_carry_the_measured_latency():
    latency = {"batch_sizes": [1], "unpruned": {"ms": {"1": 2.0}},
               "networks": {"uniform": {"pytorch": {"ms": {"1": 1.0}}, "speedup": {"1": 2.0}, "macs_ratio": 0.5,
                                        "onnxruntime": {"ms": {"1": 0.5}}}}}
    m = final_metrics({**RESULT, "latency": latency})  # uniform delivered: unprefixed and under its name
    assert m["base_latency_ms_b1"] == 2.0 and m["uniform_speedup_b1"] == 2.0 and m["speedup_b1"] == 2.0
    assert m["onnxruntime_ms_b1"] == 0.5 and m["uniform_latency_ms_b1"] == 1.0 and m["latency_ms_b1"] == 1.0
    latency["networks"]["top1"] = {"pytorch": {"ms": {"1": 0.8}}, "speedup": {"1": 2.5}, "macs_ratio": 0.45}
    m = final_metrics({**RESULT, "delivered": AGENT, "latency": latency})
    assert m["speedup_b1"] == 2.5 and m["uniform_speedup_b1"] == 2.0 and "top1_speedup_b1" not in m


def test_final_metrics_unprefixed_are_the_delivered_network():
    m = final_metrics(RESULT)
    assert m["reward"] == -1.5 and m["macs_ratio"] == 0.49 and m["macs"] == 980 and m["params_ratio"] == 0.55
    assert m["test_accuracy"] == 0.82 and m["test_accuracy_before_finetune"] == 0.72
    assert m["heldout_accuracy"] == 0.8 and m["heldout_accuracy_after_finetune"] == 0.86
    assert m["agent_reward"] == -1.2 and m["agent_macs_ratio"] == 0.45 and m["agent_test_accuracy"] == 0.8
    assert m["base_test_accuracy"] == 0.9 and m["base_macs"] == 2000
    assert m["uniform_test_accuracy"] == 0.82 and m["uniform_evaluations"] == 1 and m["uniform_heldout_accuracy"] == 0.8
    assert m["random_reward"] == -1.3 and "random_test_accuracy" not in m and "random_heldout_accuracy" not in m
    assert m["proxy_entropy_spearman"] == 0.4 and "proxy_reward_spearman" not in m
    assert m["cost_candidates"] == 12 and "cost_total_seconds" not in m  # NaN is not a metric
    assert not any(k.startswith("delivered_") for k in m)
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    assert final_metrics({}) == {}


def test_old_result_files_read_the_same():
    """Result files written before `agent`/`policy` keep loading: the same metrics, network and policies."""
    assert final_metrics(OLD_RESULT) == final_metrics(RESULT)
    assert delivered_network(OLD_RESULT) == DELIVERED and agent_pick(OLD_RESULT) == AGENT
    assert delivered_policy(OLD_RESULT) == delivered_policy(RESULT) == DELIVERED["policy"]
    assert policy_file(OLD_RESULT) == policy_file(RESULT)
    # before the final stage existed the agent's pick was delivered
    older = {k: v for k, v in OLD_RESULT.items() if k not in ("delivered", "delivered_policy")}
    assert delivered_network(older) == AGENT and delivered_policy(older) == AGENT["policy"]
    assert final_metrics(older)["test_accuracy"] == final_metrics(older)["agent_test_accuracy"] == 0.8


def test_metrics_logged_before_the_rename_are_upgraded():
    """A run logged when the unprefixed metrics were the agent's pick's reads as a run logged now."""
    now = final_metrics(RESULT)
    old = {k: v for k, v in now.items() if not k.startswith("agent_")}
    old.update({name: now[f"agent_{name}"] for _, name in NETWORK_FIGURES if f"agent_{name}" in now})
    old.update({f"delivered_{name}": now[name] for name in ("test_accuracy", "macs_ratio", "heldout_accuracy")})
    old.update(delivered_speedup_b1=2.0)
    upgraded = upgrade_metrics(old)
    assert upgraded["test_accuracy"] == 0.82 and upgraded["macs_ratio"] == 0.49 and upgraded["speedup_b1"] == 2.0
    assert upgraded["agent_test_accuracy"] == 0.8 and upgraded["agent_reward"] == -1.2
    assert not any(k.startswith("delivered_") for k in upgraded)
    assert upgrade_metrics(now) == now


def test_policy_file_is_the_delivered_networks_with_the_agents_next_to_it():
    policy = policy_file(RESULT)
    assert policy["policy"] == {"conv1": 0.75, "conv2": 0.75} and policy["delivered"] == "uniform"
    assert policy["groups"] == ["conv1", "conv2"] and policy["flops_target"] == 0.5
    assert policy["macs_ratio"] == 0.49 and policy["kept_channels"] == [12, 12]
    assert policy["test_accuracy_after_finetune"] == 0.82
    assert policy["agent"]["policy"] == {"conv1": 0.5, "conv2": 1.0} and policy["agent"]["macs_ratio"] == 0.45
    assert json.loads(json.dumps(policy)) == policy


def test_candidate_table_round_trip(tmp_path):
    records = [{"keep": [0.5, 1.0], "id": i, "reward": -1.0 + i, "kept_channels": [8, 16], "cache_hit": i == 1,
                "accuracy": None if i == 0 else 0.5, "extra": "x"} for i in range(2)]
    path = write_candidate_table(records, tmp_path / "c.csv")
    with open(path) as fh:
        header = next(csv.reader(fh))
    assert header == ["id", "reward", "accuracy", "cache_hit", "kept_channels", "keep", "extra"]  # known columns first
    rows = read_candidate_table(path)
    assert rows == [{**r, "reward": float(r["reward"])} for r in records]
    assert write_candidate_table([], tmp_path / "empty.csv").read_text().strip() == "id"


def rows():
    return [{"trial": f"t{i:05d}", "status": status, "axes": {"search.reward": r, "seed": s}, "test_accuracy": acc,
             "macs_ratio": 0.5, "run_id": f"run{i}"}
            for i, (r, s, acc, status) in enumerate([("entropy", 0, 0.8, "FINISHED"), ("entropy", 1, 0.9, "FINISHED"),
                                                      ("accuracy", 0, 0.7, "FINISHED"), ("accuracy", 1, 0.1, "FAILED")])]


def test_aggregate_over_seeds():
    agg = aggregate_rows(rows())
    assert [a["n"] for a in agg] == [2, 1]  # the failed trial is left out
    assert agg[0]["axes"] == {"search.reward": "entropy"}
    assert agg[0]["test_accuracy"] == pytest.approx(0.85) and agg[0]["test_accuracy_std"] == pytest.approx(0.05)
    assert agg[1]["test_accuracy"] == pytest.approx(0.7) and agg[1]["test_accuracy_std"] == 0.0
    assert "85.00±5.00" in format_aggregate(agg)


def test_summary_table_lists_every_trial_with_its_axes():
    table = format_table(rows())
    lines = table.splitlines()
    assert len(lines) == 5 and lines[0].split()[:3] == ["trial", "reward", "seed"]
    assert "t00000" in lines[1] and "80.00%" in lines[1] and "0.500" in lines[1]
    assert "FAILED" in lines[4] and "-" in lines[4].split()
    md = format_table(rows(), markdown=True).splitlines()
    assert md[0].startswith("| trial | reward | seed | status") and md[1].startswith("|---|")
    # the delivered network first: which finalist, its MACs, its accuracy; the agent's pick after it
    titles = [c[0] for c in SUMMARY_COLUMNS]
    assert titles[:3] == ["status", "delivered", "MACs"] and titles.index("test FT") < titles.index("agent FT")


def test_write_summary_writes_every_file(tmp_path):
    paths = write_summary(rows(), tmp_path / "summary", title="sw")
    assert set(paths) == {"csv", "md", "json", "png"} and all(p.exists() for p in paths.values())
    with open(paths["csv"]) as fh:
        table = list(csv.DictReader(fh))
    assert [r["trial"] for r in table] == ["t00000", "t00001", "t00002", "t00003"]
    assert table[0]["search.reward"] == "entropy" and table[0]["run_id"] == "run0"
    md = paths["md"].read_text()
    assert md.startswith("# sw\n") and "mean ± std over seeds" in md
    assert json.loads(paths["json"].read_text())[3]["status"] == "FAILED"
