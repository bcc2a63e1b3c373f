"""Does the label-free reward rank candidates as accuracy does? Random candidates under the budget (AMC
clipping, as random search draws them), each measured with every entropy variant (measured layers x
estimator), held-out accuracy (BN statistics re-estimated, as the search does), and, for a subset,
test accuracy after a short fine-tune, the quantity the search is after. Prints Spearman rank
correlations of each reward with those accuracies.

    python bench/bench_proxy.py --checkpoint runs/quality/fashion/resnet20_h200_e15.pt --data fashion_mnist \
        --flops-target 0.33 --candidates 48 --finetuned 12 --finetune-steps 150
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from entropy_search.data import eval_batch, load_data
from entropy_search.problem import (
    Budget,
    CandidateEvaluator,
    PruningSpace,
    build_model,
    load_checkpoint,
    random_counts,
    recalibrate_batchnorm,
)
from entropy_search.train import evaluate, train

LAYERS = ("bn", "bn_relu", "last_stage")
METHODS = ("cooccurrence", "histogram", "mass")


def short_finetune_accuracy(space: PruningSpace, keep, splits, calibration, steps: int, seed: int) -> float:
    """Test accuracy after `steps` SGD steps (batch 128) on a random subset of the train split."""
    pruned = space.prune(keep)
    recalibrate_batchnorm(pruned, calibration)
    subset = torch.utils.data.Subset(splits.train, np.random.default_rng(seed).permutation(len(splits.train))[: steps * 128].tolist())
    train(pruned, subset, epochs=1, lr=0.01, batch_size=128, seed=seed, progress=False, device="cpu")
    return evaluate(pruned, splits.test, device="cpu")


def rho(xs, ys) -> str:
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return "   -"
    return f"{spearmanr(xs, ys).statistic:+.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default=None, help="default: the checkpoint's")
    parser.add_argument("--flops-target", type=float, default=0.5)
    parser.add_argument("--flops-floor", type=float, default=0.9)
    parser.add_argument("--min-keep", type=float, default=0.1)
    parser.add_argument("--candidates", type=int, default=48)
    parser.add_argument("--finetuned", type=int, default=12, help="candidates also fine-tuned briefly (evenly spread)")
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--eval-batch", type=int, default=256)
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    ckpt = load_checkpoint(args.checkpoint)
    splits = load_data(args.data or ckpt.data, seed=int((ckpt.config or {}).get("seed", 0)))
    model = build_model(ckpt).eval()
    space = PruningSpace(model, ckpt.example_input())
    budget = Budget(space, args.flops_target, args.min_keep, args.flops_floor)
    budget.check()
    x, y = eval_batch(splits, args.eval_batch, split="heldout", seed=args.seed)
    calibration, _ = eval_batch(splits, args.calibration, split="train", seed=args.seed)
    evaluators = {
        (layers, method): CandidateEvaluator(space, x, y, entropy_layers=layers, method=method, sample=1.0,
                                             calibration=calibration)
        for layers, method in itertools.product(LAYERS, METHODS)
    }
    rng = np.random.default_rng(args.seed)
    rows, seen = [], set()
    t0 = time.perf_counter()
    while len(rows) < args.candidates:
        counts = tuple(random_counts(budget, rng))
        if counts in seen:
            continue
        seen.add(counts)
        keep = space.counts_to_keep(counts)
        row = {"keep": keep}
        for key, ev in evaluators.items():
            record = ev.evaluate(keep)
            row[key], row["accuracy"], row["macs_ratio"] = record["entropy"], record["accuracy"], record["macs_ratio"]
        rows.append(row)
    print(f"# {ckpt.model_name} on {splits.name}, flops_target {args.flops_target} (floor {args.flops_floor}), "
          f"{len(rows)} random candidates (MACs ratio {min(r['macs_ratio'] for r in rows):.3f}-"
          f"{max(r['macs_ratio'] for r in rows):.3f}), held-out batch {len(x)}, BN re-estimated on "
          f"{len(calibration)} training images, measured in {time.perf_counter() - t0:.0f} s", flush=True)

    order = sorted(range(len(rows)), key=lambda i: rows[i]["accuracy"])
    picks = [order[round(i * (len(order) - 1) / max(args.finetuned - 1, 1))] for i in range(args.finetuned)] if args.finetuned else []
    t1 = time.perf_counter()
    for i in dict.fromkeys(picks):
        rows[i]["finetuned"] = short_finetune_accuracy(space, rows[i]["keep"], splits, calibration,
                                                       args.finetune_steps, args.seed)
    tuned = [r for r in rows if "finetuned" in r]
    if tuned:
        print(f"# {len(tuned)} of them (spread over the held-out accuracy range) fine-tuned {args.finetune_steps} steps "
              f"of 128 images in {time.perf_counter() - t1:.0f} s; test accuracy "
              f"{min(r['finetuned'] for r in tuned):.4f}-{max(r['finetuned'] for r in tuned):.4f}")
    acc = [r["accuracy"] for r in rows]
    print(f"\nheld-out accuracy (the accuracy reward): range {min(acc):.3f}-{max(acc):.3f}; vs short fine-tune "
          f"accuracy: {rho([r['accuracy'] for r in tuned], [r['finetuned'] for r in tuned]) if tuned else '-'}")
    print("\nSpearman of the entropy reward (minus entropy) with accuracy; + = ranks candidates as accuracy does")
    print(f"{'layers':<12}{'estimator':<14}{'vs held-out':>12}{'vs fine-tuned':>15}")
    for layers, method in itertools.product(LAYERS, METHODS):
        key = (layers, method)
        neg = [-r[key] for r in rows]
        tuned_rho = rho([-r[key] for r in tuned], [r["finetuned"] for r in tuned]) if tuned else "-"
        print(f"{layers:<12}{method:<14}{rho(neg, acc):>12}{tuned_rho:>15}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
