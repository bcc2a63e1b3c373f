"""Measured latency (`entropy_search.latency`): positive medians per batch size, ONNX Runtime computing
what PyTorch computes, speed-ups as ratios of the same runtime, the search summary's lines, and
`entropy-search measure` on a checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from entropy_search import PruningSpace, create_model
from entropy_search.cli import main
from entropy_search.commands.search import latency_lines
from entropy_search.latency import onnx_latency, speedup, torch_latency
from entropy_search.problem.checkpoint import Checkpoint, save_checkpoint
from entropy_search.problem.finalize import export


def test_pytorch_and_onnx_runtime_latency_of_a_pruned_network(tmp_path, one_thread):
    torch.manual_seed(0)
    model = create_model("digits_cnn").eval()
    x = torch.randn(1, 1, 8, 8)
    space = PruningSpace(model, x)
    keep = [0.5] * len(space.groups)
    pruned = space.prune(keep).eval()
    base = Checkpoint(path=tmp_path / "b.pt", model_name="digits_cnn", model_kwargs={}, num_classes=10, in_channels=1,
                      image_size=8, data="digits", config={}, metrics={}, state_dict={})
    files = export(pruned, x, tmp_path, "best", onnx=True, base=base, keep=keep, round_to=1)
    full = torch_latency(model, x, batch_sizes=[1, 16], warmup=1, repeats=5)
    small = torch_latency(pruned, x, batch_sizes=[1, 16], warmup=1, repeats=5)
    assert full["runtime"] == "pytorch" and full["threads"] == 1 and set(full["ms"]) == {"1", "16"}
    assert all(ms > 0 for ms in full["ms"].values())
    gains = speedup(full, small)
    assert set(gains) == {"1", "16"} and all(g > 0 for g in gains.values())
    onnx = onnx_latency(files["onnx"], x, batch_sizes=[1, 16], warmup=1, repeats=5, reference=pruned, threads=1)
    assert onnx["runtime"] == "onnxruntime" and all(ms > 0 for ms in onnx["ms"].values())
    assert onnx["max_rel_diff_vs_pytorch"] < 1e-4  # ONNX Runtime computes what PyTorch computes
    lines = latency_lines({"batch_sizes": [1, 16], "unpruned": full,
                           "networks": {"uniform": {"pytorch": small, "speedup": gains, "macs_ratio": 0.27,
                                                    "onnxruntime": onnx}},
                           "budget": {"batch": 16, "threads": 1, "target_ratio": 0.5, "predicted_ms": 1.0,
                                      "table_unpruned_ms": 2.0, "measured_ratio": 0.52, "measured_ms": 1.04,
                                      "measured_unpruned_ms": 2.0}})
    assert lines[0].startswith("latency (cpu, 1 threads, batch 1 / 16, ms): unpruned ")
    assert "uniform:" in lines[1] and "MACs ratio 0.270" in lines[1] and "ONNX Runtime" in lines[1]
    assert lines[2] == ("latency budget (batch 16, 1 threads): target 0.500 of the unpruned latency; delivered: "
                        "predicted 0.500, measured 0.520 (1.040 of 2.000 ms)")
    with pytest.raises(Exception, match="repeats"):
        torch_latency(model, x, repeats=0)


def test_measure_command_times_a_delivered_network_like_the_search(tmp_path, capsys, one_thread):
    torch.manual_seed(0)
    model = create_model("digits_cnn").eval()
    x = torch.zeros(1, 1, 8, 8)
    space = PruningSpace(model, x)
    keep = [0.5] * len(space.groups)
    base = Checkpoint(path=tmp_path / "b.pt", model_name="digits_cnn", model_kwargs={}, num_classes=10, in_channels=1,
                      image_size=8, data="digits", config={}, metrics={}, state_dict={})
    files = export(space.prune(keep), x, tmp_path, "best_pruned", onnx=False, base=base, keep=keep, round_to=1)
    assert main(["measure", files["pytorch"], "--batch-sizes", "1", "8", "--repeats", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pruned"] and out["threads"] == 1 and out["batch_sizes"] == [1, 8]
    assert out["macs"] == space.macs(keep) and out["unpruned"]["macs"] == space.base_macs
    assert out["macs_ratio"] == pytest.approx(space.macs(keep) / space.base_macs)
    assert set(out["speedup"]) == {"1", "8"} and all(v > 0 for v in out["pytorch"]["ms"].values())
    assert out["onnxruntime"]["max_rel_diff_vs_pytorch"] < 1e-4 and out["onnx_matches_pytorch"]
    assert main(["measure", files["pytorch"], "--batch-sizes", "2", "--repeats", "2", "--rounds", "2", "--no-onnx"]) == 0
    table = capsys.readouterr().out
    assert "speed-up" in table and "MACs" in table and "ONNX" not in table


@pytest.mark.parametrize("args, message", [
    (["missing.pt"], "checkpoint missing.pt not found"),
    (["junk.pt"], "is corrupt, truncated or not a PyTorch file"),
    (["ok.pt", "--batch-sizes", "0"], "--batch-sizes must be positive integers, got [0]"),
    (["ok.pt", "--threads", "0"], "--threads, --repeats and --rounds must be >= 1"),
])
def test_measure_command_refuses_bad_input_in_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    save_checkpoint(tmp_path / "ok.pt", create_model("digits_cnn"), model_name="digits_cnn", num_classes=10,
                    in_channels=1, image_size=8, data="digits")
    assert main(["measure", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("entropy-search measure: error: ") and message in err and "\n" not in err
