"""Plots (`entropy_search.plots`): the candidates' FLOPs-versus-accuracy scatter of a search and the sweep's
comparison, written as PNG files (also when there is nothing to plot)."""

from __future__ import annotations

import matplotlib.image

from entropy_search.plots import candidate_scatter, sweep_comparison


def test_plots_write_pngs(tmp_path):
    records = [{"macs_ratio": 0.3 + 0.015 * i, "accuracy": 0.5 + 0.03 * i, "reward": -1.0 + 0.05 * ((i * 7) % 12),
                "entropy": 1.0 - 0.05 * ((i * 7) % 12)} for i in range(12)]
    result = {"top_k": [{"macs_ratio": 0.4, "heldout_accuracy": 0.8, "test_accuracy_after_finetune": 0.82}],
              "delivered": {"label": "uniform", "macs_ratio": 0.45, "heldout_accuracy": 0.7},
              "baselines": {"uniform": {"best": {"macs_ratio": 0.45, "accuracy": 0.7}}},
              "base": {"heldout_accuracy": 0.9}, "config": {"search": {"flops_target": 0.5, "reward": "entropy"}}}
    assert candidate_scatter(records, result, tmp_path / "s.png").stat().st_size > 1000
    assert candidate_scatter([], None, tmp_path / "empty.png").exists()
    rows = [{"reward_kind": rw, "flops_target": t, "macs_ratio": t - 0.01, "test_accuracy": 0.8 + 0.1 * t,
             "heldout_accuracy": 0.7, "uniform_macs_ratio": t, "uniform_test_accuracy": 0.7,
             "base_test_accuracy": 0.95} for rw in ("entropy", "accuracy") for t in (0.3, 0.5)]
    assert sweep_comparison(rows, tmp_path / "c.png").stat().st_size > 1000
    for r in rows:  # trials with measured latency get the speed-up panel (a wider figure)
        r.update(speedup_b1=0.8 / r["macs_ratio"] ** 0.5, speedup_b32=1 / r["macs_ratio"] ** 0.7)
    narrow = matplotlib.image.imread(tmp_path / "c.png").shape[1]
    assert matplotlib.image.imread(sweep_comparison(rows, tmp_path / "lat.png")).shape[1] > 1.4 * narrow
    assert sweep_comparison([], tmp_path / "none.png").exists()
