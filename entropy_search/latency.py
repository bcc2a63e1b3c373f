"""Measured latency of a network (docs/design.md, "Latency"): what MACs promise, timed. Outside the `problem`
package because it drives ONNX Runtime, a deployment runtime, not PyTorch. PyTorch eager on the
network's device and, for an exported ONNX file, ONNX Runtime on the CPU (checked to compute what PyTorch
computes). Median of repeated forwards after a warm-up, per batch size, with the threads recorded: MAC ratios
are not speed-ups (memory traffic, kernel shapes and launch costs decide that), so the result reports both."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import EntropySearchError


def _timed_ms(run, warmup: int, repeats: int, sync=None) -> tuple[float, float]:
    """(median, minimum) milliseconds of `repeats` runs after `warmup` ones. On a machine shared with other
    processes the median of a longer forward is inflated by preemption more than a shorter one's; the minimum
    estimates the latency without contention."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        run()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times), 1000 * min(times)


def torch_latency(model: nn.Module, example_input: torch.Tensor, *, batch_sizes: Sequence[int] = (1, 32),
                  warmup: int = 3, repeats: int = 15) -> dict:
    """Median milliseconds per forward of `model` (eval mode, no grad, on its device) at each batch size (`ms`;
    the fastest forward in `min_ms`)."""
    if warmup < 0 or repeats < 1:
        raise EntropySearchError(f"latency needs warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    was_training = model.training
    model.eval()
    out = {"runtime": "pytorch", "device": str(device), "threads": torch.get_num_threads(), "ms": {}, "min_ms": {}}
    try:
        with torch.no_grad():
            for batch in batch_sizes:
                x = example_input[:1].to(device).expand(batch, *example_input.shape[1:]).contiguous()
                out["ms"][str(batch)], out["min_ms"][str(batch)] = _timed_ms(lambda x=x: model(x), warmup, repeats, sync)
    finally:
        model.train(was_training)
    return out


def interleaved_latency(models: Sequence[nn.Module], example_input: torch.Tensor, *, batch_sizes: Sequence[int] = (1, 32),
                        rounds: int = 5, warmup: int = 3, repeats: int = 15) -> list[dict]:
    """`torch_latency` of several networks, taken in turn `rounds` times: per network and batch size, `ms` is the
    median over the rounds of each round's median, `min_ms` of each round's fastest forward. Interleaving spreads a
    burst of load from other processes over every network instead of letting it fall on one, so the ratios of
    their times hold better than separate measurements' on a shared machine."""
    if rounds < 1:
        raise EntropySearchError(f"latency needs rounds >= 1, got {rounds}")
    runs = [[torch_latency(m, example_input, batch_sizes=batch_sizes, warmup=warmup, repeats=repeats) for m in models]
            for _ in range(rounds)]
    out = []
    for i in range(len(models)):
        mine = [r[i] for r in runs]
        out.append({**mine[0], "rounds": rounds,
                    "ms": {b: statistics.median(r["ms"][b] for r in mine) for b in mine[0]["ms"]},
                    "min_ms": {b: statistics.median(r["min_ms"][b] for r in mine) for b in mine[0]["min_ms"]}})
    return out


def onnx_latency(path: str | Path, example_input: torch.Tensor, *, batch_sizes: Sequence[int] = (1, 32),
                 warmup: int = 3, repeats: int = 15, reference: nn.Module | None = None,
                 threads: int | None = None) -> dict:
    """Median milliseconds per run of the ONNX file with ONNX Runtime's CPU provider at each batch size; with
    `reference`, also the largest difference between its outputs and the reference module's (relative to the
    largest reference output)."""
    import onnxruntime  # deferred: a heavy optional runtime, only for exported files

    options = onnxruntime.SessionOptions()
    threads = threads or torch.get_num_threads()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = {"runtime": "onnxruntime", "device": "cpu", "threads": threads, "ms": {}, "min_ms": {}}
    for batch in batch_sizes:
        x = example_input[:1].expand(batch, *example_input.shape[1:]).contiguous().cpu().numpy()
        out["ms"][str(batch)], out["min_ms"][str(batch)] = _timed_ms(lambda x=x: session.run(None, {name: x}), warmup,
                                                                     repeats)
    if reference is not None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, *example_input.shape[1:], generator=g)
        was_training = reference.training
        reference.eval()
        with torch.no_grad():
            expected = reference.cpu()(x).numpy()
        reference.train(was_training)
        got = session.run(None, {name: x.numpy()})[0]
        out["max_rel_diff_vs_pytorch"] = float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12))
    return out


def device_name(device: str | torch.device) -> str:
    """The hardware behind a torch device: the GPU's name, or the CPU's model name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def speedup(base: dict, pruned: dict) -> dict[str, float]:
    """Base latency / pruned latency per batch size (two results of the same runtime)."""
    return {batch: base["ms"][batch] / pruned["ms"][batch] for batch in pruned["ms"] if batch in base["ms"]}
