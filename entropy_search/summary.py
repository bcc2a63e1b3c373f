"""Summaries of searches and sweeps as plain tables: no MLflow here (docs/design.md, "Tracking").

`final_metrics` flattens a search's result.json into the numbers tracked per trial; `format_table`,
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

#: Columns of the candidate table, first (the rest follow in the order they appear).
CANDIDATE_COLUMNS = ("id", "iteration", "reward", "macs_ratio", "params_ratio", "macs", "params", "entropy", "accuracy",
                     "cache_hit", "eval_seconds", "kept_channels", "keep")


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


def best_policy(result: Mapping[str, Any]) -> dict:
    """The best candidate's policy (keep ratio per channel group) with its numbers."""
    best = result.get("best") or {}
    keys = ("reward", "macs", "params", "macs_ratio", "params_ratio", "entropy", "heldout_accuracy",
            "test_accuracy_before_finetune", "test_accuracy_after_finetune", "kept_channels")
    return {"policy": result.get("best_policy"), **{k: best.get(k) for k in keys},
            "flops_target": (result.get("config") or {}).get("search", {}).get("flops_target"),
            "groups": [g.get("name") for g in result.get("groups") or []]}


def final_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a finished search, flat: best candidate, baselines, baseline model, cost."""
    best = result.get("best") or {}
    base = result.get("base") or {}
    cost = result.get("cost") or {}
    m: dict[str, Any] = {
        "reward": best.get("reward"),
        "macs_ratio": best.get("macs_ratio"),
        "params_ratio": best.get("params_ratio"),
        "macs": best.get("macs"),
        "params": best.get("params"),
        "entropy": best.get("entropy"),
        "heldout_accuracy": best.get("heldout_accuracy"),
        "test_accuracy_before_finetune": best.get("test_accuracy_before_finetune"),
        "test_accuracy": best.get("test_accuracy_after_finetune"),
        "base_macs": base.get("macs"),
        "base_params": base.get("params"),
        "base_test_accuracy": base.get("test_accuracy"),
        "base_heldout_accuracy": base.get("heldout_accuracy"),
        "base_entropy": base.get("entropy"),
    }
    for name, res in (result.get("baselines") or {}).items():
        rec, fin = res.get("best") or {}, res.get("final") or {}
        m[f"{name}_reward"] = rec.get("reward")
        m[f"{name}_macs_ratio"] = rec.get("macs_ratio")
        m[f"{name}_params_ratio"] = rec.get("params_ratio")
        m[f"{name}_entropy"] = rec.get("entropy")
        m[f"{name}_heldout_accuracy"] = rec.get("accuracy")
        m[f"{name}_test_accuracy"] = fin.get("test_accuracy_after_finetune")
        m[f"{name}_evaluations"] = res.get("evaluations")
    delivered = result.get("delivered") or {}
    m["delivered_test_accuracy"] = delivered.get("test_accuracy_after_finetune")
    m["delivered_macs_ratio"] = delivered.get("macs_ratio")
    m["delivered_heldout_accuracy"] = delivered.get("heldout_accuracy")
    latency = result.get("latency") or {}
    label = delivered.get("label")
    for batch, ms in ((latency.get("unpruned") or {}).get("ms") or {}).items():
        m[f"base_latency_ms_b{batch}"] = ms
    for name, row in (latency.get("networks") or {}).items():
        for prefix in dict.fromkeys([name, "delivered"] if name == label else [name]):
            for batch, ms in row["pytorch"]["ms"].items():
                m[f"{prefix}_latency_ms_b{batch}"] = ms
                m[f"{prefix}_speedup_b{batch}"] = row["speedup"].get(batch)
            for batch, ms in ((row.get("onnxruntime") or {}).get("ms") or {}).items():
                m[f"{prefix}_onnxruntime_ms_b{batch}"] = ms
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


#: (column title, row key, format) of the printed summary table, after the axes.
SUMMARY_COLUMNS = (
    ("status", "status", "s"),
    ("MACs", "macs_ratio", ".3f"),
    ("params", "params_ratio", ".3f"),
    ("best reward", "reward", ".4f"),
    ("held-out", "heldout_accuracy", "%"),
    ("test pre-FT", "test_accuracy_before_finetune", "%"),
    ("test FT", "test_accuracy", "%"),
    ("uniform FT", "uniform_test_accuracy", "%"),
    ("random FT", "random_test_accuracy", "%"),
    ("delivered FT", "delivered_test_accuracy", "%"),
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
    cols = [c for c in SUMMARY_COLUMNS if c[1] in ("macs_ratio", "heldout_accuracy", "test_accuracy",
                                                    "uniform_test_accuracy", "random_test_accuracy",
                                                    "delivered_test_accuracy")]
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
