"""Time to the delivered network, side by side on one machine in one run: uniform pruning's prune + fine-tune
(`entropy-search prune --flops-target`) and a search with the shipped defaults but for its final stage, in three
ways: `search-halving` (`selection.method: halving` with `survivors: 0`: the finalists judged on short fine-tunes
as Tune trials under ASHA, only the delivered network fine-tuned in full; `--set selection.survivors=2` gives the
shipped default, the last rung's two best and uniform pruning fine-tuned in full and judged), `search-full` (`selection.method: full`: every finalist
fine-tuned in full as parallel Ray tasks, then judged) and `search-full-serial` (the same, fine-tuned one after
another in the driver, `finetune.parallel: false`). For each: wall time of the command and the delivered network's
test accuracy; for the searches, the fine-tune phase's and the final stage's seconds and how many fine-tunes ran at
once. The full searches run the same seeds, so their delivered networks should be the same.

Each run is its own process and folder; a finished run (its row in rows.jsonl, keyed by method, seed and the
`--set` overrides) is not run again, so an interrupted benchmark continues where it stopped. The table is printed
from rows.jsonl.

    python bench/bench_delivery.py --preset fashion30 --target 0.1 --seeds 0 1 2
    python bench/bench_delivery.py --preset fashion30 --target 0.1 --methods uniform search-halving --set stop.patience=10
    python bench/bench_delivery.py --preset digits --target 0.5 --report-only
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from bench_quality import timed  # this folder: one way to time a command of a benchmark

from entropy_search.jsonio import read_jsonl
from entropy_search.summary import delivered_network

ROOT = Path(__file__).resolve().parent.parent

PRESETS: dict[str, dict] = {
    # the offline default's network: the digits CNN (its baseline trained by the first run)
    "digits": {"overrides": ["model.name=digits_cnn", "data.name=digits"], "data": "digits", "model": "digits_cnn"},
    # ResNet-20 / Fashion-MNIST from the converged baseline committed under bench/baselines/ (bench_quality's
    # fashion30: 3 fine-tune epochs, 10% of the baseline's training)
    "fashion30": {"overrides": ["model.name=resnet20", "data.name=fashion_mnist", "data.eval_batch=256",
                                "finetune.epochs=3"],
                  "checkpoint": "bench/baselines/resnet20_fashion_mnist_e30.pt", "data": "fashion_mnist",
                  "epochs": 3},
}
#: The methods and the overrides that make each (the searches: on top of the preset's and --set's).
METHODS: dict[str, list[str]] = {
    "uniform": [],
    "search-halving": ["selection.method=halving", "selection.survivors=0"],
    "search-full": ["selection.method=full"],
    "search-full-serial": ["selection.method=full", "finetune.parallel=false"],
}


def checkpoint_of(args) -> Path:
    preset = PRESETS[args.preset].get("checkpoint")
    return args.checkpoint or (ROOT / preset if preset else args.out / "baseline.pt")


def overrides(args) -> list[str]:
    return PRESETS[args.preset]["overrides"] + args.set


def finetune_epochs(args) -> int:
    """The searches' fine-tune epochs (a --set wins over the preset's, which wins over the schema's 5)."""
    epochs = PRESETS[args.preset].get("epochs", 5)
    for item in overrides(args):
        if item.startswith("finetune.epochs="):
            epochs = int(item.split("=", 1)[1])
    return epochs


def row_set(args, method: str) -> list[str]:
    """The --set overrides a row ran with (none for uniform pruning, which no search setting changes)."""
    return [] if method == "uniform" else list(args.set)


def run(args, method: str, seed: int) -> dict:
    """One method at one seed, in its own process; its row."""
    suffix = "".join("-" + re.sub(r"[^\w.=]", "_", item) for item in row_set(args, method))  # a folder per set
    folder = args.out / f"{method}-s{seed}{suffix}"
    ckpt = checkpoint_of(args)
    if method == "uniform":
        cmd = [sys.executable, "-m", "entropy_search.cli", "prune", str(ckpt), "--flops-target", str(args.target),
               "--epochs", str(finetune_epochs(args)), "--seed", str(seed), "--out", str(folder / "uniform.pt"),
               "--no-progress"]
    else:
        cmd = [sys.executable, "-m", "entropy_search.cli", "search", str(ROOT / "examples" / "digits_search.yaml"),
               "--output", str(folder), "--no-progress", "--overwrite", "--set", f"search.flops_target={args.target}",
               "--set", f"seed={seed}", "--set", f"model.checkpoint={ckpt}"]
        for item in PRESETS[args.preset]["overrides"] + METHODS[method] + args.set:  # --set wins
            cmd += ["--set", item]
    folder.mkdir(parents=True, exist_ok=True)
    stdout, wall = timed(cmd, f"{method} seed {seed}")
    row = {"method": method, "seed": seed, "target": args.target, "set": row_set(args, method), "wall_seconds": wall}
    if method == "uniform":
        found = re.search(r"test top-1 fine-tuned\s+([\d.]+)", stdout)
        row["test_accuracy"] = float(found.group(1)) if found else None
    else:
        result = json.loads((folder / "result.json").read_text())
        delivered = delivered_network(result)
        cost = result["cost"]
        row.update(test_accuracy=delivered["test_accuracy_after_finetune"], delivered=delivered["label"],
                   kept_channels=delivered["kept_channels"], search_seconds=cost.get("search_seconds"),
                   finetune_seconds=cost.get("finetune_seconds"), finetunes_at_once=cost.get("finetunes_at_once"),
                   selection_seconds=result["selection"].get("seconds"), iterations=cost.get("iterations"),
                   stopped_by=cost.get("stopped_by"), total_seconds=cost.get("total_seconds"))
    print(f"    delivered test accuracy {row['test_accuracy']}", flush=True)
    return row


def report(rows: list[dict]) -> None:
    print(f"\n{'method':20}{'seed':>5}{'wall s':>9}{'x uniform':>11}{'fine-tunes s':>14}{'at once':>9}"
          f"{'final stage s':>15}{'test acc':>10}  delivered  set")
    uniform = {r["seed"]: r["wall_seconds"] for r in rows if r["method"] == "uniform"}
    for r in sorted(rows, key=lambda r: (r["seed"], list(METHODS).index(r["method"]), r.get("set", []))):
        ratio = f"{r['wall_seconds'] / uniform[r['seed']]:.2f}" if r["seed"] in uniform else ""
        finetunes = f"{r['finetune_seconds']:.0f}" if r.get("finetune_seconds") is not None else ""
        final = f"{r['selection_seconds']:.0f}" if r.get("selection_seconds") is not None else ""
        print(f"{r['method']:20}{r['seed']:>5}{r['wall_seconds']:>9.0f}{ratio:>11}{finetunes:>14}"
              f"{r.get('finetunes_at_once', ''):>9}{final:>15}{100 * r['test_accuracy']:>9.2f}%  "
              f"{r.get('delivered', ''):9}  {' '.join(r.get('set', []))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="fashion30")
    parser.add_argument("--target", type=float, default=0.1, help="fraction of the baseline's MACs to keep")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--checkpoint", type=Path, default=None, help="baseline (default: the preset's)")
    parser.add_argument("--set", action="append", default=[], help="extra config override for the searches")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/delivery/<preset>-t<target>")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    args.out = args.out or ROOT / "bench" / "delivery" / f"{args.preset}-t{args.target:g}"
    ckpt = checkpoint_of(args)
    if not ckpt.exists() and not args.report_only:  # trained once, outside every timed run
        print(f"training the baseline {ckpt} ...", flush=True)
        subprocess.run([sys.executable, "-m", "entropy_search.cli", "train", "--model", PRESETS[args.preset]["model"],
                        "--data", PRESETS[args.preset]["data"], "--out", str(ckpt), "--no-progress"], cwd=ROOT,
                       check=True)
    rows_file = args.out / "rows.jsonl"
    rows = read_jsonl(rows_file) if rows_file.exists() else []
    if not args.report_only:
        for seed in args.seeds:
            for method in args.methods:
                if any(r["method"] == method and r["seed"] == seed and r.get("set", []) == row_set(args, method)
                       for r in rows):
                    continue
                rows.append(run(args, method, seed))
                with open(rows_file, "a") as fh:  # each row as it finishes
                    fh.write(json.dumps(rows[-1]) + "\n")
    report(rows)
    searches = {(r["seed"], r["method"]): r for r in rows if r["method"] != "uniform" and not r.get("set")}
    for seed in args.seeds:
        a, b = searches.get((seed, "search-full")), searches.get((seed, "search-full-serial"))
        if a and b:
            same = a["delivered"] == b["delivered"] and a["kept_channels"] == b["kept_channels"]
            print(f"seed {seed}: parallel and serial fine-tunes delivered {'the same' if same else 'another'} candidate "
                  f"({a['delivered']}, {b['delivered']}): {100 * a['test_accuracy']:.2f}% and "
                  f"{100 * b['test_accuracy']:.2f}% on test (the weights differ when the threads do)")


if __name__ == "__main__":
    main()
