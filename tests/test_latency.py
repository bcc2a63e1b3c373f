"""Measured latency (`entropy_search.problem.latency`): positive medians per batch size, ONNX Runtime computing
what PyTorch computes, speed-ups as ratios of the same runtime, and the search summary's lines."""

from __future__ import annotations

import pytest
import torch

from entropy_search import PruningSpace, create_model
from entropy_search.commands.search import latency_lines
from entropy_search.latency import onnx_latency, speedup, torch_latency
from entropy_search.problem.checkpoint import Checkpoint
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
                                                    "onnxruntime": onnx}}})
    assert lines[0].startswith("latency (cpu, 1 threads, batch 1 / 16, ms): unpruned ")
    assert "uniform:" in lines[1] and "MACs ratio 0.270" in lines[1] and "ONNX Runtime" in lines[1]
    with pytest.raises(Exception, match="repeats"):
        torch_latency(model, x, repeats=0)
