"""Plots of searches and sweeps (matplotlib, Agg backend: no display needed).

* `candidate_scatter`: one search's candidates, FLOPs ratio versus held-out accuracy, coloured by
  iteration, with the top-k, the agent's pick, the delivered network, the uniform and random-search
  baselines and the unpruned network marked, and the FLOPs target as a line.
* `sweep_comparison`: one point per trial, the delivered network's FLOPs ratio versus its test accuracy
  after fine-tuning (left) and held-out accuracy at search time (middle), one colour per reward, the
  mean per reward and target joined by a line, the baselines (uniform pruning, random search, Torch-Pruning's
  recipes) for comparison; and, for the trials
  whose latency was measured, the measured speed-up of the delivered and uniform networks against their
  MACs ratio, next to the speed-up the MAC ratio promises (right).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

REWARD_COLOURS = {"entropy": "tab:red", "accuracy": "tab:blue", "accuracy_flops": "tab:purple"}
#: Marker and colour of each baseline (uniform pruning, random search, Torch-Pruning's recipes).
BASELINE_MARKERS = {"uniform": ("s", "tab:orange"), "random": ("^", "tab:green"), "tp_magnitude": ("D", "tab:cyan"),
                    "tp_taylor": ("v", "tab:brown"), "tp_isomorphic": ("<", "tab:pink")}


def _ok(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def candidate_scatter(records: Sequence[Mapping[str, Any]], result: Mapping[str, Any] | None,
                      path: str | os.PathLike, *, title: str | None = None) -> Path:
    """FLOPs ratio vs held-out accuracy of every candidate of a search (reward when no accuracy)."""
    result = result or {}
    path = Path(path)
    use_acc = any(_ok(r.get("accuracy")) for r in records)
    ykey, ylabel = ("accuracy", "held-out accuracy") if use_acc else ("reward", "reward")
    pts = [(r["macs_ratio"], r[ykey], r.get("iteration", 0)) for r in records
           if _ok(r.get("macs_ratio")) and _ok(r.get(ykey))]
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    if pts:
        xs, ys, its = zip(*pts)
        sc = ax.scatter(xs, ys, c=its, cmap="viridis", s=14, alpha=0.7, label=f"candidates ({len(pts)})")
        fig.colorbar(sc, ax=ax, label="iteration")
    yk_final = "heldout_accuracy" if use_acc else "reward"
    top = [t for t in result.get("top_k") or [] if _ok(t.get("macs_ratio")) and _ok(t.get(yk_final))]
    if top:
        ax.scatter([t["macs_ratio"] for t in top], [t[yk_final] for t in top], s=90, facecolors="none",
                   edgecolors="black", linewidths=1.3, label=f"top-{len(top)}")
        ax.scatter([top[0]["macs_ratio"]], [top[0][yk_final]], marker="*", s=260, c="red", edgecolors="black",
                   zorder=5, label="agent's pick")
    delivered = result.get("delivered") or {}
    if _ok(delivered.get("macs_ratio")) and _ok(delivered.get(yk_final)):
        ax.scatter([delivered["macs_ratio"]], [delivered[yk_final]], marker="P", s=200, c="gold", edgecolors="black",
                   zorder=6, label=f"delivered ({delivered.get('label')})")
    for name, res in (result.get("baselines") or {}).items():
        rec = res.get("best") or {}
        if _ok(rec.get("macs_ratio")) and _ok(rec.get(ykey)):
            marker, colour = BASELINE_MARKERS.get(name, ("D", "grey"))
            ax.scatter([rec["macs_ratio"]], [rec[ykey]], marker=marker, s=110, c=colour, edgecolors="black", zorder=4,
                       label=f"{name} baseline")
    base = result.get("base") or {}
    base_y = base.get("heldout_accuracy") if use_acc else None
    if _ok(base_y):
        ax.axhline(base_y, color="grey", ls=":", lw=1.2, label=f"unpruned ({base_y:.3f})")
    cfg = result.get("config") or {}
    target = (cfg.get("search") or {}).get("flops_target")
    if _ok(target):
        ax.axvline(target, color="grey", ls="--", lw=1, label=f"FLOPs target {target:g}")
    ax.set_xlabel("FLOPs (MACs) ratio to the unpruned network")
    ax.set_ylabel(ylabel)
    if title is None:
        search = cfg.get("search") or {}
        title = (f"{(cfg.get('model') or {}).get('name', '')}: reward {search.get('reward', '?')}, "
                 f"target {search.get('flops_target', '?')}, seed {cfg.get('seed', '?')}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def sweep_comparison(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, title: str = "") -> Path:
    """Cross-trial comparison of the rewards at each FLOPs target (rows from `tracking.sweep_rows`)."""
    import numpy as np

    path = Path(path)
    batches = sorted({int(k.rsplit("_b", 1)[1]) for r in rows for k in r
                      if k.startswith(("speedup_b", "uniform_speedup_b")) and _ok(r[k])})
    fig, axes = plt.subplots(1, 3 if batches else 2, figsize=(18 if batches else 12, 5), dpi=110, sharex=True)
    panels = (("test_accuracy", "test accuracy after fine-tuning"),
              ("heldout_accuracy", "held-out accuracy at search time (before fine-tuning)"))
    rewards = sorted({str(r.get("reward_kind")) for r in rows})
    base_acc = [r["base_test_accuracy"] for r in rows if _ok(r.get("base_test_accuracy"))]
    for ax, (key, label) in zip(axes, panels):
        for reward in rewards:
            colour = REWARD_COLOURS.get(reward, None)
            mine = [r for r in rows if str(r.get("reward_kind")) == reward and _ok(r.get("macs_ratio")) and _ok(r.get(key))]
            if not mine:
                continue
            ax.scatter([r["macs_ratio"] for r in mine], [r[key] for r in mine], c=colour, s=40, alpha=0.8,
                       edgecolors="black", linewidths=0.5, label=f"delivered, reward {reward}")
            _mean_line(ax, mine, "macs_ratio", key, colour, np)
        for name, (marker, colour) in BASELINE_MARKERS.items():
            xkey, ykey = f"{name}_macs_ratio", f"{name}_{key}"
            points = [r for r in rows if _ok(r.get(xkey)) and _ok(r.get(ykey))]
            if points:
                ax.scatter([r[xkey] for r in points], [r[ykey] for r in points], marker=marker, c=colour, s=32,
                           alpha=0.7, edgecolors="black", linewidths=0.5, label=f"{name} baseline")
                if name == "uniform":
                    _mean_line(ax, points, xkey, ykey, colour, np, ls=":")
        if key == "test_accuracy" and base_acc:
            ax.axhline(float(np.mean(base_acc)), color="grey", ls="--", lw=1, label="unpruned (test)")
        for target in sorted({r["flops_target"] for r in rows if _ok(r.get("flops_target"))}):
            ax.axvline(target, color="lightgrey", lw=0.8, zorder=0)
        ax.set_xlabel("FLOPs (MACs) ratio to the unpruned network")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        _legend(ax)
    if batches:
        _speedup_panel(axes[2], rows, batches, np)
    if not rows:
        axes[0].text(0.5, 0.5, "no finished trial", ha="center", va="center", transform=axes[0].transAxes)
    fig.suptitle(title or "entropy vs accuracy reward at each FLOPs target")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _speedup_panel(ax, rows, batches, np) -> None:
    """Measured speed-up over the unpruned network against the MACs ratio, per batch size (CPU, PyTorch eager),
    for the delivered and the uniform networks; the dashed curve is what the MAC ratio promises (1 / ratio)."""
    markers = ("o", "s", "^", "D", "v")
    xs = []
    for i, batch in enumerate(batches):
        for who, prefix, colour in (("delivered", "", "tab:red"), ("uniform", "uniform_", "tab:orange")):
            pts = [(r[f"{prefix}macs_ratio"], r[f"{prefix}speedup_b{batch}"]) for r in rows
                   if _ok(r.get(f"{prefix}macs_ratio")) and _ok(r.get(f"{prefix}speedup_b{batch}"))]
            if pts:
                xs += [p[0] for p in pts]
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], c=colour,
                           s=40, alpha=0.8, edgecolors="black", linewidths=0.5, label=f"{who}, batch {batch}")
    if xs:
        grid = np.linspace(max(min(xs) * 0.9, 1e-3), 1.0, 100)
        ax.plot(grid, 1 / grid, color="grey", ls="--", lw=1, label="1 / MACs ratio")
    ax.axhline(1.0, color="lightgrey", lw=0.8, zorder=0)
    ax.set_xlabel("FLOPs (MACs) ratio to the unpruned network")
    ax.set_ylabel("measured speed-up (CPU, PyTorch eager)")
    ax.grid(alpha=0.3)
    _legend(ax)


def _mean_line(ax, rows, xkey, ykey, colour, np, ls="-") -> None:
    """Join the mean (x, y) of the trials of each FLOPs target."""
    by_target: dict[float, list] = {}
    for r in rows:
        by_target.setdefault(r.get("flops_target") if _ok(r.get("flops_target")) else r[xkey], []).append(r)
    if len(by_target) < 2:
        return
    pts = sorted((float(np.mean([r[xkey] for r in g])), float(np.mean([r[ykey] for r in g]))) for g in by_target.values())
    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colour, ls=ls, lw=1.2, alpha=0.8)
