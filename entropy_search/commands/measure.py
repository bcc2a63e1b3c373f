"""`entropy-search measure CHECKPOINT`: MACs, parameters and measured latency of any entropy-search checkpoint (a
baseline, or a pruned network such as a search's `best_pruned.pt`), the way a search measures what it delivers
(docs/design.md, "Latency"): PyTorch eager and ONNX Runtime on the CPU, median of repeated forwards after a warm-up,
per batch size, with the threads recorded; ONNX Runtime's outputs checked against PyTorch's. A pruned network is
shown next to its unpruned architecture (the same model, rebuilt at full width: latency and MACs do not depend on
the weights), with the measured speed-up beside the MAC ratio."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from ..config import OutputConfig
from ..errors import ConfigError, EntropySearchError
from ..latency import device_name, interleaved_latency, onnx_latency, speedup
from ..models import create_model
from ..problem import build_model, count_macs, count_params, export_onnx, load_checkpoint

#: ONNX Runtime must compute what PyTorch computes, within this relative difference (issue 12).
ONNX_TOLERANCE = 1e-4


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "measure",
        help="MACs, parameters and CPU latency (PyTorch and ONNX Runtime) of a checkpoint",
        description="Measure a checkpoint as a search measures its delivered network: MACs and parameters (PyTorch's "
        "FLOP counter), CPU latency with PyTorch eager and with ONNX Runtime on an ONNX export (median of repeated "
        "forwards after a warm-up, per batch size; ONNX outputs checked equal to PyTorch's within 1e-4); a pruned "
        "checkpoint also next to its unpruned architecture (speed-up and MAC ratio).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", help="an entropy-search checkpoint (baseline.pt, best_pruned.pt, ..._pruned.pt)")
    parser.add_argument("--batch-sizes", type=int, nargs="+",
                        default=OutputConfig.model_fields["latency_batch_sizes"].get_default(call_default_factory=True),
                        help="batch sizes to time")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--warmup", type=int, default=3, help="forwards before timing")
    parser.add_argument("--repeats", type=int, default=15, help="timed forwards (the median is reported)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with a pruned checkpoint: time it and its unpruned architecture in turn this many times "
                             "(the median over rounds; steadier speed-ups on a busy machine)")
    parser.add_argument("--no-onnx", action="store_true", help="PyTorch only (no ONNX export, no ONNX Runtime)")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    parser.set_defaults(func=run)
    return parser


def measure_checkpoint(path: str | Path, *, batch_sizes: list[int], threads: int = 1, warmup: int = 3,
                       repeats: int = 15, rounds: int = 1, onnx: bool = True) -> dict:
    """The measurements of one checkpoint (see the module docstring) as a plain dict."""
    if not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError(f"--batch-sizes must be positive integers, got {batch_sizes}")
    if threads < 1 or warmup < 0 or repeats < 1 or rounds < 1:
        raise ConfigError(f"--threads, --repeats and --rounds must be >= 1 and --warmup >= 0, got {threads}, {repeats}, "
                          f"{rounds}, {warmup}")
    ckpt = load_checkpoint(path)
    model = build_model(ckpt)
    example = ckpt.example_input()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        full = None
        if ckpt.keep is not None:
            full = create_model(ckpt.model_name, num_classes=ckpt.num_classes, in_channels=ckpt.in_channels,
                                **ckpt.model_kwargs).eval()
        timed = interleaved_latency([model] if full is None else [model, full], example, batch_sizes=batch_sizes,
                                    rounds=rounds, warmup=warmup, repeats=repeats)
        out = {"checkpoint": str(ckpt.path), "model": ckpt.model_name, "data": ckpt.data,
               "pruned": ckpt.keep is not None, "keep": ckpt.keep, "input": list(example.shape[1:]),
               "device": "cpu", "device_name": device_name("cpu"), "threads": threads, "batch_sizes": batch_sizes,
               "macs": count_macs(model, example), "params": count_params(model), "pytorch": timed[0]}
        if full is not None:
            out["unpruned"] = {"macs": count_macs(full, example), "params": count_params(full), "pytorch": timed[1]}
            out["macs_ratio"] = out["macs"] / out["unpruned"]["macs"]
            out["params_ratio"] = out["params"] / out["unpruned"]["params"]
            out["speedup"] = speedup(out["unpruned"]["pytorch"], out["pytorch"])
            out["speedup_fastest"] = {b: out["unpruned"]["pytorch"]["min_ms"][b] / out["pytorch"]["min_ms"][b]
                                      for b in out["speedup"]}
        if onnx:
            with tempfile.TemporaryDirectory() as tmp:
                file = export_onnx(model, example, Path(tmp) / "model.onnx")
                out["onnxruntime"] = onnx_latency(file, example, batch_sizes=batch_sizes, warmup=warmup,
                                                  repeats=repeats, reference=model, threads=threads)
            diff = out["onnxruntime"]["max_rel_diff_vs_pytorch"]
            out["onnx_matches_pytorch"] = diff <= ONNX_TOLERANCE
    finally:
        torch.set_num_threads(previous)
    return out


def run(args: argparse.Namespace) -> int:
    out = measure_checkpoint(args.checkpoint, batch_sizes=args.batch_sizes, threads=args.threads,
                             warmup=args.warmup, repeats=args.repeats, rounds=args.rounds, onnx=not args.no_onnx)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(format_measurements(out))
    if out.get("onnx_matches_pytorch") is False:
        raise EntropySearchError(f"ONNX Runtime's outputs differ from PyTorch's by {out['onnxruntime']['max_rel_diff_vs_pytorch']:.2e} "
                                 f"(relative), more than {ONNX_TOLERANCE:g}: the exported file does not compute this network")
    return 0


def format_measurements(out: dict) -> str:
    """The measurements as a small table (ms per forward of a whole batch)."""
    pruned = "unpruned" in out
    lines = [f"{out['checkpoint']}: {out['model']}{' (pruned)' if out['pruned'] else ''}, input {'x'.join(map(str, out['input']))}; "
             f"CPU {out['device_name']}, {out['threads']} thread(s), median of the timed forwards (speed-ups also from "
             "the fastest ones: on a busy machine the median of a longer forward suffers more preemption)"]
    head = f"{'':26}{'this':>12}" + (f"{'unpruned':>12}{'ratio':>9}" if pruned else "")
    lines.append(head)

    def row(label, value, base=None, fmt=",.0f"):
        text = f"{label:26}{format(value, fmt):>12}"
        if pruned and base is not None:
            text += f"{format(base, fmt):>12}{value / base:>9.3f}"
        return text

    lines.append(row("MACs", out["macs"], out.get("unpruned", {}).get("macs")))
    lines.append(row("params", out["params"], out.get("unpruned", {}).get("params")))
    for b in map(str, out["batch_sizes"]):
        base = out["unpruned"]["pytorch"]["ms"][b] if pruned else None
        text = row(f"PyTorch ms, batch {b}", out["pytorch"]["ms"][b], base, ".3f")
        if pruned:
            fastest = out["unpruned"]["pytorch"]["min_ms"][b] / out["pytorch"]["min_ms"][b]
            text += f"   speed-up {out['speedup'][b]:.2f}x (fastest forwards: {fastest:.2f}x)"
        lines.append(text)
        if "onnxruntime" in out:
            lines.append(row(f"ONNX Runtime ms, batch {b}", out["onnxruntime"]["ms"][b], None, ".3f"))
    if "onnxruntime" in out:
        diff = out["onnxruntime"]["max_rel_diff_vs_pytorch"]
        lines.append(f"ONNX Runtime outputs vs PyTorch: max relative difference {diff:.1e} "
                     f"({'within' if out['onnx_matches_pytorch'] else 'NOT within'} {ONNX_TOLERANCE:g})")
    return "\n".join(lines)
