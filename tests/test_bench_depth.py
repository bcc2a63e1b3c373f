"""bench/bench_depth.py: which blocks a depth variant drops, what the shallower network computes, and its report."""

from __future__ import annotations

import json

import pytest
import torch
from bench_scripts import load_bench
from torch import nn

from entropy_search.errors import EntropySearchError
from entropy_search.models import create_model
from entropy_search.problem import PruningSpace


def test_dropping_blocks_computes_the_network_without_them_and_leaves_the_original_whole():
    bench = load_bench("bench_depth")
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=1).eval()
    x = torch.randn(4, 1, 16, 16)
    full = model(x)
    shallow = bench.drop_blocks(model, x, [2, 1, 0]).eval()
    with torch.no_grad():
        h = model.relu(model.bn1(model.conv1(x)))
        h = model.layer1[0](h)
        h = model.layer2[1](model.layer2[0](h))
        h = model.layer3(h)
        expected = model.fc(torch.flatten(model.pool(h), 1))
        assert torch.allclose(shallow(x), expected, atol=1e-6)
        assert torch.equal(model(x), full)
    assert [type(b).__name__ for b in shallow.layer1] == ["BasicBlock", "Identity", "Identity"]
    assert all(type(b).__name__ == "BasicBlock" for b in model.layer1)
    assert PruningSpace(shallow, x).base_macs < PruningSpace(model, x).base_macs


def test_a_variant_that_cannot_be_dropped_is_refused_with_the_stage_named():
    bench = load_bench("bench_depth")
    model = create_model("resnet20", num_classes=10, in_channels=1).eval()
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(EntropySearchError, match="stage layer2 has 3 blocks: can drop 0 to 2, not 3"):
        bench.drop_blocks(model, x, [0, 3, 0])
    with pytest.raises(EntropySearchError, match="names 2 stages; the network has 3"):
        bench.drop_blocks(model, x, [1, 1])

    class Widening(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1))

        def forward(self, x):
            return self.layer1(x)

    with pytest.raises(EntropySearchError, match=r"cannot drop layer1.1: layer1.1 maps \(4, 16, 16\) to \(8, 16, 16\)"):
        bench.drop_blocks(Widening(), x, [1])


def test_the_report_compares_each_variant_with_full_depth_on_test():
    bench = load_bench("bench_depth")
    config = {"model": {"name": "m", "checkpoint": "c"}, "data": {"name": "d"}, "search": {"flops_target": 0.1},
              "finetune": {"epochs": 5}}

    def row(variant, test):
        return {"variant": variant, "uniform_keep": 0.3, "macs_ratio": 0.099, "analytic_macs_match": True,
                "test_accuracy_before_finetune": 0.5, "heldout_accuracy_after_finetune": test, "test_accuracy_after_finetune": test}

    shards = [{"config": config, "variants": ["0-0-0", "1-1-1"], "base_test_accuracy": 0.93, "environment": {"cuda": "none"},
               "rows": [row("0-0-0", 0.910), row("1-1-1", 0.920)]},
              {"config": config, "rows": [row("0-0-0", 0.912), row("1-1-1", 0.930)]}]
    text = bench.report(shards)
    assert "| 0-0-0 | 2 |" in text and text.splitlines()[3].endswith("| +0.00 |")
    assert "| 1-1-1 | 2 |" in text and text.splitlines()[4].endswith("| +1.40 |")


def test_a_small_study_fine_tunes_each_variant_at_the_full_network_s_budget_and_times_them(tmp_path, capsys):
    """End to end on digits: every variant is pruned to the target of the full network's MACs, counted exactly,
    written as it finishes, and timed against the unpruned network; at equal latency a shallower variant keeps
    at least the channels it keeps at equal MACs, and the report names it apart."""
    bench = load_bench("bench_depth")
    digits = ["--set", "data.name=digits", "--set", f"model.checkpoint={tmp_path / 'r20.pt'}", "--set", "model.train_epochs=1",
              "--set", "search.flops_target=0.3", "--set", "finetune.epochs=1"]
    common = digits + ["--variants", "0-0-0", "1-1-1"]
    assert bench.main(common + ["--seeds", "1", "--out", str(tmp_path / "d.json")]) == 0
    rows = json.loads((tmp_path / "d.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["0-0-0", "1-1-1"]
    assert all(r["analytic_macs_match"] and 0.97 * 0.3 <= r["macs_ratio"] <= 0.3 for r in rows)
    assert rows[1]["uniform_keep"] > rows[0]["uniform_keep"]  # fewer blocks: wider layers at the same MACs
    capsys.readouterr()
    assert bench.main(common + ["--latency", "--equal-latency", "--rounds", "1", "--out", str(tmp_path / "keep.json")]) == 0
    table = capsys.readouterr().out
    assert "| unpruned | 1 | 1.000 |" in table and "| 0-0-0 | 0.539 | 0.29" in table and "| 1-1-1 |" in table
    keep = json.loads((tmp_path / "keep.json").read_text())["keep"]
    assert list(keep) == ["1-1-1"] and rows[1]["uniform_keep"] <= keep["1-1-1"] <= 1.0
    assert bench.main(digits + ["--variants", "1-1-1", "--seeds", "1",
                                     "--keep-from", str(tmp_path / "keep.json"), "--out", str(tmp_path / "e.json")]) == 0
    matched = json.loads((tmp_path / "e.json").read_text())
    assert matched["rows"][0]["uniform_keep"] == keep["1-1-1"] and matched["rows"][0]["analytic_macs_match"]
    text = bench.report([json.loads((tmp_path / "d.json").read_text()), matched])
    assert "| 1-1-1 | 1 |" in text and "| 1-1-1 at equal latency | 1 |" in text
