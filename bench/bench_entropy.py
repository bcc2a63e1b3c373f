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

import entropy_search.problem.entropy as ent  # noqa: E402
from entropy_search.models import create_model  # noqa: E402
from entropy_search.problem.entropy import DEFAULT_SAMPLE, EntropyProbe, network_entropy  # noqa: E402


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


def bench_model(
    name: str, device: torch.device, batch: int, repeats: int, estimators: dict, warmup: int = 2
) -> list[dict]:
    """Rows (estimator, forward ms, forward+entropy ms, ratios, value, deviation) for one model.

    Each repeat times a forward, then a forward with each probe; a row's ratio is the median over
    repeats of (its time - that repeat's forward time) / forward time, in wall-clock time and (CPU) in
    process CPU time, which other processes on a shared machine disturb less.
    """
    torch.manual_seed(0)
    model = create_model(name).to(device).eval()
    x = torch.randn(batch, 3, 32, 32, device=device)
    probes = {label: make(model) for label, make in estimators.items()}
    fwd: list[tuple[float, float]] = []
    both: dict[str, list[tuple[float, float]]] = {label: [] for label in probes}
    values: dict[str, float] = {}
    with torch.no_grad():
        for _ in range(warmup):  # warm-up (allocator, caches, Triton builds, last_stage's first forward)
            model(x)
            for probe in probes.values():
                with probe:
                    model(x)
        for _ in range(repeats):
            fwd.append(_timed(device, lambda: model(x)))
            for label, probe in probes.items():
                probe.reset()
                with probe:
                    both[label].append(_timed(device, lambda: model(x)))
                values[label] = probe.value()
    exact = values.get("fast exact")
    rows = []
    for label in probes:
        ratios = [((t[0] - f[0]) / f[0], (t[1] - f[1]) / f[1]) for t, f in zip(both[label], fwd, strict=True)]
        rows.append({
            "model": name, "estimator": label,
            "fwd_ms": statistics.median(f[0] for f in fwd) * 1e3,
            "fwd_ent_ms": statistics.median(t[0] for t in both[label]) * 1e3,
            "ratio": statistics.median(r[0] for r in ratios),
            "cpu_ratio": statistics.median(r[1] for r in ratios) if device.type == "cpu" else math.nan,
            "value": values[label],
            "dev": abs(values[label] - exact) if exact is not None else math.nan,
        })
    return rows


def _timed(device: torch.device, fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call, synchronised on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def ranking(name: str, device: torch.device, batch: int, candidates: int, samples: tuple[float, ...]) -> list[dict]:
    """Does a sampled estimate order candidates as the exact one does?

    Random candidates (a keep ratio in [0.25, 1] per BN layer, random channels) are evaluated by
    masking: pruned channels are zeroed at the BN output, so later activations change as in the
    search, and only kept channels are measured. Reports each sample's largest deviation from the
    exact value and the Spearman rank correlation over the candidates.
    """
    torch.manual_seed(1)
    model = create_model(name).to(device).eval()
    x = torch.randn(batch, 3, 32, 32, device=device)
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    gen = torch.Generator().manual_seed(2)
    values: dict[float, list[float]] = {s: [] for s in (1.0, *samples)}
    for _ in range(candidates):
        kept = {}
        for n, m in bns.items():
            c = m.num_features
            k = max(1, round(c * (0.25 + 0.75 * float(torch.rand((), generator=gen)))))
            kept[n] = torch.randperm(c, generator=gen)[:k].sort().values
        masks = {n: torch.zeros(bns[n].num_features, device=device).index_fill_(0, i.to(device), 1.0) for n, i in kept.items()}
        hooks = [bns[n].register_forward_hook(lambda mod, i, o, w=w: o * w.view(1, -1, 1, 1)) for n, w in masks.items()]
        try:
            for s in values:
                values[s].append(network_entropy(model, x, kept=kept, sample=s))
        finally:
            for h in hooks:
                h.remove()
    exact = torch.tensor(values[1.0], dtype=torch.float64)
    return [{
        "model": name, "sample": s, "spread": float(exact.max() - exact.min()),
        "max_dev": float((torch.tensor(values[s], dtype=torch.float64) - exact).abs().max()),
        "spearman": _spearman(exact, torch.tensor(values[s], dtype=torch.float64)),
    } for s in samples]


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def estimators(quick: bool, device: torch.device) -> dict[str, Callable[[nn.Module], object]]:
    """The estimators compared: naive, the fast exact one, the default (sampled) one, and other settings.

    Rows other than the sampled ones measure every map (``sample=1.0``) so that their cost is comparable.
    """
    exact = {"sample": 1.0}
    chosen = {
        "naive": lambda m: NaiveProbe(m),
        "fast exact": lambda m: EntropyProbe(m, **exact),
        "fast exact, torch": lambda m: Patched(EntropyProbe(m, **exact), "_TRITON_DEVICES", ()),
        f"fast default ({DEFAULT_SAMPLE})": lambda m: EntropyProbe(m),
        "fast sample=0.5": lambda m: EntropyProbe(m, sample=0.5),
        "fast bn_relu": lambda m: EntropyProbe(m, "bn_relu", **exact),
        "fast last_stage": lambda m: EntropyProbe(m, "last_stage", **exact),
        "fast histogram": lambda m: EntropyProbe(m, method="histogram", **exact),
        "fast mass": lambda m: EntropyProbe(m, method="mass", **exact),
    }
    if device.type != "cuda":
        del chosen["fast exact, torch"]  # the Triton kernel is for CUDA only
    if quick:
        return {k: chosen[k] for k in ("naive", "fast exact", f"fast default ({DEFAULT_SAMPLE})")}
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on CPU, 256 on CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="default: 9 (1 with --quick)")
    parser.add_argument("--models", nargs="+", default=["resnet56", "vgg16_bn"])
    parser.add_argument("--candidates", type=int, default=10, help="masked candidates for the ranking check")
    parser.add_argument("--quick", action="store_true", help="smoke run: resnet20, batch 2, one repeat")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch = args.batch or (2 if args.quick else 256 if device.type == "cuda" else 64)
    repeats = args.repeats or (1 if args.quick else 9)
    models = ["resnet20"] if args.quick else args.models
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"# entropy cost vs forward: device={device} ({card}), batch={batch}, repeats={repeats}, "
          f"torch {torch.__version__}, bins=16, all BatchNorm2d outputs unless said")
    print(f"{'model':<10} {'estimator':<20} {'fwd ms':>8} {'fwd+ent ms':>11} {'ratio':>6} {'cpu ratio':>9} {'entropy':>8} {'|dev|':>7}")
    for name in models:
        for r in bench_model(name, device, batch, repeats, estimators(args.quick, device), 1 if args.quick else 2):
            print(f"{r['model']:<10} {r['estimator']:<20} {r['fwd_ms']:8.1f} {r['fwd_ent_ms']:11.1f} "
                  f"{r['ratio']:6.2f} {r['cpu_ratio']:9.2f} {r['value']:8.4f} {r['dev']:7.4f}")
    print("ratio = (fwd+ent - fwd) / fwd: the entropy's cost in forward passes (median over repeats; 'cpu' in"
          " process CPU time); |dev| = |value - fast exact| (bn_relu, last_stage, histogram and mass measure"
          " something else, not approximations of it)")
    n_cand = 3 if args.quick else args.candidates
    print(f"\n# sampled vs exact over {n_cand} masked random candidates (batch {batch})")
    print(f"{'model':<10} {'sample':>6} {'exact spread':>12} {'max |dev|':>9} {'spearman':>8}")
    for name in models:
        for r in ranking(name, device, batch, n_cand, (0.5, 0.25)):
            print(f"{r['model']:<10} {r['sample']:6.2f} {r['spread']:12.4f} {r['max_dev']:9.4f} {r['spearman']:8.3f}")

if __name__ == "__main__":
    main()
