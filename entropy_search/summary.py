"""Summaries of searches and sweeps as plain tables: no MLflow here (docs/design.md, "Tracking").

`final_metrics` flattens a search's result.json into the numbers tracked per trial (unprefixed: the delivered
network's; `agent_*`: the agent's own pick); `format_table`,
`aggregate_rows` and `write_summary` turn one row per trial into the sweep's summary table, its
mean ± std over seeds, and the files logged on the sweep's parent run.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .plots import sweep_comparison
from .problem import PEER_RECIPES

#: Columns of the candidate table, first (the rest follow in the order they appear).
CANDIDATE_COLUMNS = ("id", "iteration", "reward", "macs_ratio", "params_ratio", "macs", "params", "blocks_kept",
                     "entropy", "accuracy", "cache_hit", "eval_seconds", "kept_channels", "keep", "dropped_blocks")


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> {dotted key: string}; lists become JSON (``agent.hidden_sizes = [64, 64]``)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple, Mapping)):
            out[name] = json.dumps(value, default=str)
        elif value is None:
            out[name] = "None"
        else:
            out[name] = str(value)
    return out


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics dict (NaN/None/strings dropped)."""
    return {str(k): float(v) for k, v in metrics.items() if finite(v)}


def write_candidate_table(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Every evaluated candidate, one row each (lists as JSON), as CSV."""
    path = Path(path)
    columns = [c for c in CANDIDATE_COLUMNS if any(c in r for r in records)]
    for r in records:
        for k in r:
            if k not in columns:
                columns.append(k)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns or ["id"])
        writer.writeheader()
        for r in records:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    return path


def read_candidate_table(path: str | os.PathLike) -> list[dict]:
    """Rows of a candidate table (numbers parsed, lists decoded)."""
    rows = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            rows.append({k: _parse_cell(v) for k, v in row.items()})
    return rows


def _parse_cell(value: str):
    if value == "":
        return None
    if value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    if value in ("True", "False"):
        return value == "True"
    return value


def agent_pick(result: Mapping[str, Any]) -> dict:
    """The agent's own pick (its top-1 by reward, finalised) of a search result; result files written before
    the delivered network was named apart call it `best`."""
    return dict(result.get("agent") or result.get("best") or {})


def delivered_network(result: Mapping[str, Any]) -> dict:
    """The network the search delivered (`best_pruned.pt`) with its measured figures; result files written
    before the final stage existed delivered the agent's pick."""
    return dict(result.get("delivered") or agent_pick(result))


def delivered_policy(result: Mapping[str, Any]) -> dict | None:
    """{group name: keep ratio} of the delivered network."""
    return (result.get("policy") or delivered_network(result).get("policy") or result.get("delivered_policy")
            or result.get("best_policy"))


#: A finalised network's figures, as recorded by the search (record key, flat metric name).
NETWORK_FIGURES = (("reward", "reward"), ("macs_ratio", "macs_ratio"), ("params_ratio", "params_ratio"),
                   ("macs", "macs"), ("params", "params"), ("blocks_kept", "blocks_kept"), ("entropy", "entropy"),
                   ("heldout_accuracy", "heldout_accuracy"),
                   ("heldout_accuracy_after_finetune", "heldout_accuracy_after_finetune"),
                   ("test_accuracy_before_finetune", "test_accuracy_before_finetune"),
                   ("test_accuracy_after_finetune", "test_accuracy"))


def policy_file(result: Mapping[str, Any]) -> dict:
    """The delivered network's policy (keep ratio per channel group) with its figures, which finalist it was,
    and the agent's own pick next to it (`policy.json`, logged with every trial)."""
    delivered, agent = delivered_network(result), agent_pick(result)
    keys = [key for key, _ in NETWORK_FIGURES] + ["kept_channels", "dropped_blocks"]
    return {"policy": delivered_policy(result), "delivered": delivered.get("label"),
            **{k: delivered.get(k) for k in keys},
            "flops_target": (result.get("config") or {}).get("search", {}).get("flops_target"),
            "groups": [g.get("name") for g in result.get("groups") or []],
            "agent": {"policy": agent.get("policy"), **{k: agent.get(k) for k in keys}}}


def final_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a finished search, flat. Unprefixed names are the delivered network's (what
    `best_pruned.pt` holds); `agent_*` the agent's own pick; `uniform_*`, `random_*` the baselines; `base_*`
    the unpruned network; `cost_*` the search's cost."""
    delivered, agent = delivered_network(result), agent_pick(result)
    base = result.get("base") or {}
    cost = result.get("cost") or {}
    m: dict[str, Any] = {}
    for key, name in NETWORK_FIGURES:
        m[name] = delivered.get(key)
        m[f"agent_{name}"] = agent.get(key)
    m.update({
        "base_macs": base.get("macs"),
        "base_params": base.get("params"),
        "base_test_accuracy": base.get("test_accuracy"),
        "base_heldout_accuracy": base.get("heldout_accuracy"),
        "base_entropy": base.get("entropy"),
    })
    for name, res in (result.get("baselines") or {}).items():
        rec, fin = res.get("best") or {}, res.get("final") or {}
        m[f"{name}_reward"] = rec.get("reward")
        m[f"{name}_macs_ratio"] = rec.get("macs_ratio")
        m[f"{name}_params_ratio"] = rec.get("params_ratio")
        m[f"{name}_blocks_kept"] = rec.get("blocks_kept")
        m[f"{name}_entropy"] = rec.get("entropy")
        m[f"{name}_heldout_accuracy"] = rec.get("accuracy")
        m[f"{name}_test_accuracy"] = fin.get("test_accuracy_after_finetune")
        m[f"{name}_evaluations"] = res.get("evaluations")
    latency = result.get("latency") or {}
    label = delivered.get("label")
    for batch, ms in ((latency.get("unpruned") or {}).get("ms") or {}).items():
        m[f"base_latency_ms_b{batch}"] = ms
    for name, row in (latency.get("networks") or {}).items():
        # the delivered network unprefixed; uniform pruning under its name too, so its columns are always there
        prefixes = ["" if name == label else f"{name}_"] + (["uniform_"] if name == label == "uniform" else [])
        for prefix in prefixes:
            for batch, ms in row["pytorch"]["ms"].items():
                m[f"{prefix}latency_ms_b{batch}"] = ms
                m[f"{prefix}speedup_b{batch}"] = row["speedup"].get(batch)
            for batch, ms in ((row.get("onnxruntime") or {}).get("ms") or {}).items():
                m[f"{prefix}onnxruntime_ms_b{batch}"] = ms
    check = latency.get("budget") or {}
    if check:
        m["latency_budget_target_ratio"] = check.get("target_ratio")
        m["latency_budget_predicted_ratio"] = check["predicted_ms"] / check["table_unpruned_ms"]
        m["latency_budget_measured_ratio"] = check.get("measured_ratio")
    proxy = result.get("proxy") or {}
    m["proxy_entropy_spearman"] = proxy.get("entropy_reward_vs_accuracy")
    m["proxy_reward_spearman"] = proxy.get("reward_vs_accuracy")
    for key in ("iterations", "candidates", "evaluations", "cache_hits", "search_seconds", "candidates_per_second",
                "evaluations_per_second", "baselines_seconds", "finetune_seconds", "total_seconds"):
        m[f"cost_{key}"] = cost.get(key)
    return numeric(m)


def final_stage_metrics(result: Mapping[str, Any]) -> dict[int, dict[str, float]]:
    """What the final stage measured, as metric histories: {step: {`final_stage_heldout_accuracy_<label>`: held-out
    accuracy}}, one step per rung (halving: its cumulative SGD steps; full: the fine-tune's epochs), so each
    finalist's curve through the rungs shows in MLflow."""
    out: dict[int, dict[str, float]] = {}
    for rung in (result.get("selection") or {}).get("rungs") or []:
        step = int(rung.get("steps", rung.get("epochs")) or 0)
        out.setdefault(step, {}).update(numeric({f"final_stage_heldout_accuracy_{label}": acc
                                                 for label, acc in (rung.get("heldout_accuracy") or {}).items()}))
    return out


def upgrade_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """A trial's final metrics as `final_metrics` names them now. Runs logged before the delivered network had
    the unprefixed names gave them to the agent's pick and the delivered network's to `delivered_*`: those are
    renamed (the agent's to `agent_*`, the delivered network's unprefixed); newer runs are returned as they are."""
    if "delivered_test_accuracy" not in metrics or "agent_test_accuracy" in metrics:
        return dict(metrics)
    out = {k: v for k, v in metrics.items() if not k.startswith("delivered_")}
    for _, name in NETWORK_FIGURES:
        if name in metrics:
            out[f"agent_{name}"] = out.pop(name)
    for key, value in metrics.items():
        if key.startswith("delivered_"):
            out[key.removeprefix("delivered_")] = value
    return out


#: (column title, row key, format) of the printed summary table, after the axes: first the delivered network
#: (which finalist it is, then its figures), then the agent's own pick and the baselines (uniform pruning, random
#: search, Torch-Pruning's recipes) after the same fine-tune.
SUMMARY_COLUMNS = (
    ("status", "status", "s"),
    ("delivered", "delivered", "s"),
    ("MACs", "macs_ratio", ".3f"),
    ("params", "params_ratio", ".3f"),
    ("blocks", "blocks_kept", ".0f"),
    ("held-out", "heldout_accuracy", "%"),
    ("test pre-FT", "test_accuracy_before_finetune", "%"),
    ("test FT", "test_accuracy", "%"),
    ("agent MACs", "agent_macs_ratio", ".3f"),
    ("agent blocks", "agent_blocks_kept", ".0f"),
    ("agent FT", "agent_test_accuracy", "%"),
    ("uniform FT", "uniform_test_accuracy", "%"),
    ("uniform_shallow FT", "uniform_shallow_test_accuracy", "%"),
    ("random FT", "random_test_accuracy", "%"),
    *((f"{name} FT", f"{name}_test_accuracy", "%") for name in PEER_RECIPES),
    ("agent reward", "agent_reward", ".4f"),
    ("proxy", "proxy_reward_spearman", ".2f"),
    ("cand", "cost_candidates", ".0f"),
    ("cand/s", "cost_candidates_per_second", ".1f"),
    ("min", "cost_total_seconds", "min"),
)


def _fmt(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if fmt == "s":
        return str(value)
    if fmt == "%":
        return f"{100 * float(value):.2f}%"
    if fmt == "min":
        return f"{float(value) / 60:.1f}"
    return format(float(value), fmt)


def axis_names(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    names: list[str] = []
    for row in rows:
        for k in row.get("axes") or {}:
            if k not in names:
                names.append(k)
    return names


def format_table(rows: Sequence[Mapping[str, Any]], *, markdown: bool = False) -> str:
    """The summary table: one line per trial, axis values first, then the results."""
    axes = axis_names(rows)
    headers = ["trial"] + [a.split(".")[-1] for a in axes] + [c[0] for c in SUMMARY_COLUMNS]
    body = []
    for row in rows:
        cells = [str(row.get("trial"))]
        cells += [str((row.get("axes") or {}).get(a, "-")) for a in axes]
        cells += [_fmt(row.get(key), fmt) for _, key, fmt in SUMMARY_COLUMNS]
        body.append(cells)
    return _render(headers, body, markdown)


def aggregate_rows(rows: Sequence[Mapping[str, Any]], over: str = "seed") -> list[dict]:
    """Mean and standard deviation over the `over` axis (seeds) of the finished trials' results."""
    axes = [a for a in axis_names(rows) if a != over and a.split(".")[-1] != over]
    groups: dict[tuple, list] = {}
    for row in rows:
        if row.get("status") != "FINISHED":
            continue
        key = tuple(str((row.get("axes") or {}).get(a, "-")) for a in axes)
        groups.setdefault(key, []).append(row)
    out = []
    for key, members in groups.items():
        agg: dict[str, Any] = {"axes": dict(zip(axes, key)), "n": len(members)}
        for _, col, fmt in SUMMARY_COLUMNS:
            if fmt == "s":
                continue
            vals = [float(m[col]) for m in members if finite(m.get(col))]
            if vals:
                agg[col] = float(np.mean(vals))
                agg[col + "_std"] = float(np.std(vals))
        out.append(agg)
    return out


def format_aggregate(agg: Sequence[Mapping[str, Any]], *, markdown: bool = False) -> str:
    axes = axis_names(agg)
    cols = [c for c in SUMMARY_COLUMNS if c[1] in ("macs_ratio", "heldout_accuracy") or c[1].endswith("test_accuracy")]
    headers = [a.split(".")[-1] for a in axes] + ["n"] + [c[0] for c in cols]
    body = []
    for row in agg:
        cells = [str(row["axes"].get(a, "-")) for a in axes] + [str(row["n"])]
        for _, key, fmt in cols:
            mean, std = row.get(key), row.get(key + "_std")
            if mean is None:
                cells.append("-")
            elif fmt == "%":
                cells.append(f"{100 * mean:.2f}±{100 * std:.2f}")
            else:
                cells.append(f"{mean:{fmt}}±{std:{fmt}}")
        body.append(cells)
    return _render(headers, body, markdown)


def _render(headers: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    for r in body:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def write_summary(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, *, title: str = "") -> dict[str, Path]:
    """summary.csv / summary.md / summary.json and comparison.png in `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "summary.csv", "md": out / "summary.md", "json": out / "summary.json",
             "png": out / "comparison.png"}
    axes = axis_names(rows)
    cols = ["trial", "status", *axes] + [k for _, k, _ in SUMMARY_COLUMNS if k != "status"] + ["run_id"]
    with open(paths["csv"], "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(cols)
        for row in rows:
            writer.writerow([(row.get("axes") or {}).get(c, row.get(c)) if c in axes else row.get(c) for c in cols])
    md = [f"# {title}" if title else "# sweep summary", "", format_table(rows, markdown=True)]
    agg = aggregate_rows(rows)
    if agg and any(a["n"] > 1 for a in agg):
        md += ["", "## mean ± std over seeds", "", format_aggregate(agg, markdown=True)]
    paths["md"].write_text("\n".join(md) + "\n")
    paths["json"].write_text(json.dumps(list(rows), indent=2, default=str) + "\n")
    sweep_comparison(rows, paths["png"], title=title)
    return paths
