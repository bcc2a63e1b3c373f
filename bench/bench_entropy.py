"""Cost of the network's spatial entropy relative to the forward pass it measures (issue 2, "Speed").

For ResNet-56 and VGG-16-BN (all BatchNorm2d outputs; batch 64 on CPU, 256 on CUDA) prints the
forward time, forward + entropy time and entropy / forward ratio for a naive estimator (float
normalisation, int64 pair indices, one bincount per direction and layer) and the fast probe in a few
settings, medians of repeats that alternate forward and forward + entropy (so a shared, noisy
machine affects both alike), and each estimate's deviation from the exact fast estimator.

    python bench/bench_entropy.py [--device cpu|cuda] [--batch N] [--repeats N] [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import entropy_search.entropy as ent  # noqa: E402
from entropy_search.entropy import EntropyProbe  # noqa: E402
from entropy_search.models import create_model  # noqa: E402


class NaiveProbe:
    """The straightforward estimator: float normalisation, int64 indices, a bincount per direction."""

    def __init__(self, model: nn.Module, bins: int = 16) -> None:
        self.bins = bins
        self.mods = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        self.handles: list = []
        self.reset()

    def reset(self) -> NaiveProbe:
        self.total, self.count = 0.0, 0
        return self

    def hook(self, module: nn.Module, inputs, out: torch.Tensor) -> None:
        g = self.bins
        b, c, h, w = out.shape
        m = b * c
        flat = out.detach().float().reshape(m, -1)
        lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
        q = ((flat - lo) / (hi - lo).clamp_min(1e-12) * g).floor().clamp(max=g - 1).long().view(m, h, w)
        base = (torch.arange(m, device=out.device) * g * g).view(m, 1, 1)
        right = (base + q[:, :, :-1] * g + q[:, :, 1:]).reshape(-1)
        down = (base + q[:, :-1, :] * g + q[:, 1:, :]).reshape(-1)
        counts = torch.bincount(right, minlength=m * g * g) + torch.bincount(down, minlength=m * g * g)
        p = counts.view(m, -1).float()
        p = p / p.sum(1, keepdim=True)
        self.total = self.total + (-torch.special.xlogy(p, p).sum(1)).sum()
        self.count += m

    def __enter__(self) -> NaiveProbe:
        self.handles = [m.register_forward_hook(self.hook) for m in self.mods]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def value(self) -> float:
        return float(self.total) / self.count


class Patched:
    """A probe run with one module attribute of `entropy` changed (to time an internal variant)."""

    def __init__(self, probe: EntropyProbe, attr: str, value: object) -> None:
        self.probe, self.attr, self.setting, self.saved = probe, attr, value, None

    def reset(self) -> Patched:
        self.probe.reset()
        return self

    def __enter__(self) -> Patched:
        self.saved = getattr(ent, self.attr)
        setattr(ent, self.attr, self.setting)
        self.probe.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.probe.detach()
        setattr(ent, self.attr, self.saved)

    def value(self) -> float:
        return self.probe.value()


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def timed(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return timed


def bench_model(
    name: str, device: torch.device, batch: int, repeats: int, estimators: dict, warmup: int = 2
) -> list[dict]:
    """Rows (estimator, forward ms, forward+entropy ms, ratio, value, deviation) for one model."""
    torch.manual_seed(0)
    model = create_model(name).to(device).eval()
    x = torch.randn(batch, 3, 32, 32, device=device)
    timed = _timer(device)
    probes = {label: make(model) for label, make in estimators.items()}
    fwd: list[float] = []
    both: dict[str, list[float]] = {label: [] for label in probes}
    values: dict[str, float] = {}
    with torch.no_grad():
        for _ in range(warmup):  # warm-up (allocator, caches, first-forward resolution of last_stage)
            model(x)
            for probe in probes.values():
                with probe:
                    model(x)
        for _ in range(repeats):
            fwd.append(timed(lambda: model(x)))
            for label, probe in probes.items():
                probe.reset()
                with probe:
                    both[label].append(timed(lambda: model(x)))
                values[label] = probe.value()
    f = statistics.median(fwd)
    exact = values.get("fast exact")
    rows = []
    for label in probes:
        fe = statistics.median(both[label])
        dev = abs(values[label] - exact) if exact is not None else math.nan
        rows.append({"model": name, "estimator": label, "fwd_ms": f * 1e3, "fwd_ent_ms": fe * 1e3,
                     "ratio": (fe - f) / f, "value": values[label], "dev": dev})
    return rows


def estimators(quick: bool, device: torch.device) -> dict[str, Callable[[nn.Module], object]]:
    """The estimators compared: naive, the fast exact one, and fast settings that measure fewer maps."""
    chosen = {
        "naive": lambda m: NaiveProbe(m),
        "fast exact": lambda m: EntropyProbe(m),
        "fast exact, torch": lambda m: Patched(EntropyProbe(m), "_TRITON_DEVICES", ()),
        "fast exact, clogc hist": lambda m: Patched(EntropyProbe(m), "_CLOGC_BY_HISTOGRAM", True),
        "fast bn_relu": lambda m: EntropyProbe(m, "bn_relu"),
        "fast sample=0.5": lambda m: EntropyProbe(m, sample=0.5),
        "fast sample=0.25": lambda m: EntropyProbe(m, sample=0.25),
        "fast last_stage": lambda m: EntropyProbe(m, "last_stage"),
        "fast histogram": lambda m: EntropyProbe(m, method="histogram"),
        "fast mass": lambda m: EntropyProbe(m, method="mass"),
    }
    if device.type == "cuda":
        del chosen["fast exact, clogc hist"]  # a CPU-only variant
    else:
        del chosen["fast exact, torch"]  # the Triton kernel is for CUDA only
    if quick:
        return {k: chosen[k] for k in ("naive", "fast exact", "fast sample=0.25")}
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on CPU, 256 on CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="default: 9 (1 with --quick)")
    parser.add_argument("--models", nargs="+", default=["resnet56", "vgg16_bn"])
    parser.add_argument("--quick", action="store_true", help="smoke run: resnet20, batch 2, one repeat")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch = args.batch or (2 if args.quick else 256 if device.type == "cuda" else 64)
    repeats = args.repeats or (1 if args.quick else 9)
    models = ["resnet20"] if args.quick else args.models
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"# entropy cost vs forward: device={device} ({card}), batch={batch}, repeats={repeats}, "
          f"torch {torch.__version__}, bins=16, all BatchNorm2d outputs unless said")
    print(f"{'model':<10} {'estimator':<24} {'fwd ms':>8} {'fwd+ent ms':>11} {'ratio':>7} {'entropy':>9} {'|dev|':>9}")
    for name in models:
        for r in bench_model(name, device, batch, repeats, estimators(args.quick, device), 1 if args.quick else 2):
            print(f"{r['model']:<10} {r['estimator']:<24} {r['fwd_ms']:8.1f} {r['fwd_ent_ms']:11.1f} "
                  f"{r['ratio']:7.2f} {r['value']:9.4f} {r['dev']:9.4f}")
    print("ratio = (fwd+ent - fwd) / fwd, the entropy's cost in forward passes; |dev| = |value - fast exact|"
          " (histogram and mass are other estimators, not approximations of it)")


if __name__ == "__main__":
    main()
