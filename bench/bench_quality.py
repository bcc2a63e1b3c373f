"""Quality of the search (issue 3): entropy-rewarded vs accuracy-rewarded agent vs uniform and random
pruning at the same FLOPs, after fine-tuning, over seeds; mean and spread.

Each (target, reward, seed) is one `entropy-search search` in its own process and output folder; a
finished run (its result.json exists) is not run again, so an interrupted benchmark continues where it
stopped. The table is printed from the result files.

    python bench/bench_quality.py --preset digits                      # digits CNN, 2x, 3 seeds
    python bench/bench_quality.py --preset fashion --checkpoint X.pt   # ResNet-20 / Fashion-MNIST, 3x and 5x
    python bench/bench_quality.py --preset fashion --report-only       # the table of what has finished
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PRESETS: dict[str, dict] = {
    # the offline default: digits CNN, 2x FLOPs reduction, 25 PPO iterations x 16 candidates, 10 fine-tune epochs
    "digits": {
        "targets": [0.5],
        "overrides": ["model.name=digits_cnn", "data.name=digits", "stop.iterations=25", "finetune.epochs=10"],
    },
    # ResNet-20 on Fashion-MNIST (Debian's dataset-fashion-mnist), 3x and 5x; sized for 2 CPU cores:
    # 10 iterations x 16 candidates, the best candidate and the baselines fine-tuned for 1 epoch
    "fashion": {
        "targets": [0.33, 0.2],
        "overrides": ["model.name=resnet20", "data.name=fashion_mnist", "data.eval_batch=256", "stop.iterations=10",
                      "finetune.epochs=1", "search.top_k=1", "model.train_epochs=2"],
    },
}
ROWS = [("entropy", "agent"), ("accuracy", "agent"), ("entropy", "uniform"), ("entropy", "random"),
        ("accuracy", "random")]


def run_dir(out: Path, target: float, reward: str, seed: int) -> Path:
    return out / f"t{target:g}" / f"{reward}-s{seed}"


def run_one(args, target: float, reward: str, seed: int) -> None:
    folder = run_dir(args.out, target, reward, seed)
    if (folder / "result.json").exists():
        return
    cmd = [sys.executable, "-m", "entropy_search.cli", "search", str(ROOT / "examples" / "digits_search.yaml"),
           "--output", str(folder), "--no-progress", "--overwrite",
           "--set", f"search.flops_target={target}", "--set", f"search.reward={reward}", "--set", f"seed={seed}",
           "--set", f"model.checkpoint={args.checkpoint or args.out / 'baseline.pt'}"]
    for item in PRESETS[args.preset]["overrides"] + args.set:
        cmd += ["--set", item]
    t0 = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] target {target} reward {reward} seed {seed} ...", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL if not args.verbose else None)
    print(f"    done in {time.perf_counter() - t0:.0f} s", flush=True)


def _stats(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    spread = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {spread:.2f}"


def _row(result: dict, reward: str, kind: str) -> dict:
    if kind == "agent":
        best = result["best"]
        return {"macs": best["macs_ratio"], "heldout": best["heldout_accuracy"],
                "before": best["test_accuracy_before_finetune"], "after": best["test_accuracy_after_finetune"]}
    res = result["baselines"][kind]
    final = res.get("final") or {}
    return {"macs": final.get("macs_ratio"), "heldout": (res.get("best") or {}).get("accuracy"),
            "before": final.get("test_accuracy_before_finetune"), "after": final.get("test_accuracy_after_finetune")}


def _entropy_spearman(folder: Path) -> float | None:
    """The entropy reward's rank agreement with held-out accuracy over one search's distinct candidates."""
    from entropy_search.problem import proxy_agreement

    path = folder / "candidates.jsonl"
    if not path.exists():
        return None
    distinct = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            distinct[tuple(row["kept_channels"])] = row
    return proxy_agreement(list(distinct.values()))["entropy_reward_vs_accuracy"]


def report(args) -> str:
    lines = []
    for target in args.targets:
        results = {}
        for reward in ("entropy", "accuracy"):
            for seed in args.seeds:
                path = run_dir(args.out, target, reward, seed) / "result.json"
                if path.exists():
                    results[(reward, seed)] = json.loads(path.read_text())
        if not results:
            continue
        base = [r["base"]["test_accuracy"] for r in results.values()]
        seeds = sorted({s for _, s in results})
        lines.append(f"\n{args.preset}: flops_target {target:g} ({1 / target:.1f}x), seeds {seeds}, "
                     f"unpruned test accuracy {100 * statistics.fmean(base):.2f}%")
        lines.append("| candidate | reward it was picked by | runs | MACs ratio | held-out acc. in search (%) "
                     "| test acc. before fine-tune (%) | test acc. after fine-tune (%) |")
        lines.append("|---|---|---|---|---|---|---|")
        for reward, kind in ROWS:
            rows = [_row(r, reward, kind) for (rw, _), r in sorted(results.items()) if rw == reward]
            if not rows:
                continue
            picked = "-" if kind == "uniform" else reward
            macs = [r["macs"] for r in rows if r["macs"] is not None]
            lines.append(
                f"| {kind} | {picked} | {len(rows)} | {statistics.fmean(macs):.3f} | {_stats([r['heldout'] for r in rows])} "
                f"| {_stats([r['before'] for r in rows])} | {_stats([r['after'] for r in rows])} |"
            )
        per_seed = []
        for seed in seeds:
            ent = results.get(("entropy", seed))
            if ent:
                per_seed.append(_row(ent, "entropy", "agent")["after"] - _row(ent, "entropy", "uniform")["after"])
        rhos = [_entropy_spearman(run_dir(args.out, target, rw, sd)) for rw, sd in sorted(results)]
        rhos = [r for r in rhos if r is not None]
        if rhos:
            lines.append(f"Spearman rank correlation of the entropy reward with held-out accuracy over each search's "
                         f"distinct candidates ({len(rhos)} searches): {statistics.fmean(rhos):+.2f} "
                         f"(range {min(rhos):+.2f} to {max(rhos):+.2f}; 1 = ranks them as accuracy does)")
        if per_seed:
            lines.append(f"entropy agent minus uniform after fine-tuning, per seed (points): "
                         f"{', '.join(f'{100 * d:+.2f}' for d in per_seed)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="digits")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--targets", nargs="+", type=float, default=None, help="default: the preset's")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="baseline checkpoint (default: OUT/baseline.pt, trained by the first run if missing)")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/quality/<preset>")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="show each search's output")
    args = parser.parse_args(argv)
    args.targets = args.targets or PRESETS[args.preset]["targets"]
    args.out = (args.out or ROOT / "runs" / "quality" / args.preset).resolve()
    if not args.report_only:
        for target in args.targets:
            for seed in args.seeds:
                for reward in ("entropy", "accuracy"):
                    run_one(args, target, reward, seed)
    print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
