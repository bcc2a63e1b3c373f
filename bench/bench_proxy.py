"""Which label-free reward ranks candidates as accuracy does? The protocol that chooses the default reward
(docs/design.md, "Rewards"; written before the numbers were seen):

1. development cases: the digits CNN at FLOPs targets 0.5 and 0.3, ResNet-20 on Fashion-MNIST at 0.33;
2. per case, >= 100 candidates drawn as the search draws them (random actions through the budget's
   clipping, `flops_floor` as configured), each measured once (BN statistics re-estimated on 256
   training images, as the search does): every label-free reward (`entropy`, the paper's, exact;
   `kl`; `feature`; `agreement`, from the top-1 agreement every case recorded)
   and held-out accuracy;
3. Spearman rank correlation of each reward with held-out accuracy over all candidates, and with
   held-out accuracy after a short fine-tune over >= 12 of them spread over the accuracy range (the
   test split is never used);
4. the default reward is the best label-free reward whose Spearman with held-out accuracy is >= 0.6 on
   every case, the paper's `entropy` if it qualifies (`entropy_search.problem.choose_default_reward`).

    python bench/bench_proxy.py --checkpoint CKPT --flops-target 0.5 --candidates 100 --finetuned 12 --out case.json
    python bench/bench_proxy.py --choose case1.json case2.json case3.json
    python bench/bench_proxy.py --choose bench/proxy_cases/*.json    # the measured development cases

`--entropy-variants` also measures every entropy variant (measured layers x estimator).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from entropy_search.data import eval_batch, load_data
from entropy_search.problem import (
    LABEL_FREE_REWARDS,
    Budget,
    CandidateEvaluator,
    PruningSpace,
    build_model,
    choose_default_reward,
    collapse_rate,
    compute_reward,
    load_checkpoint,
    random_counts,
    recalibrate_batchnorm,
)
from entropy_search.train import evaluate, train

LAYERS = ("bn", "bn_relu", "last_stage")
METHODS = ("cooccurrence", "histogram", "mass")


def short_finetune_accuracy(space: PruningSpace, keep, splits, calibration, steps: int, seed: int) -> float:
    """Held-out accuracy after `steps` SGD steps (batch 128) on a random subset of the train split."""
    pruned = space.prune(keep)
    recalibrate_batchnorm(pruned, calibration)
    subset = torch.utils.data.Subset(splits.train, np.random.default_rng(seed).permutation(len(splits.train))[: steps * 128].tolist())
    train(pruned, subset, epochs=1, lr=0.01, batch_size=128, seed=seed, progress=False, device="cpu")
    return evaluate(pruned, splits.heldout, device="cpu")


def spearman(xs, ys) -> float | None:
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return float(spearmanr(xs, ys).statistic)


def fmt(value: float | None) -> str:
    return "   -" if value is None else f"{value:+.2f}"


def measure(args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint)
    splits = load_data(args.data or ckpt.data, seed=int((ckpt.config or {}).get("seed", 0)),
                       heldout_fraction=float((ckpt.config or {}).get("heldout_fraction", 0.1)))
    model = build_model(ckpt).eval()
    space = PruningSpace(model, ckpt.example_input())
    budget = Budget(space, args.flops_target, args.min_keep, args.flops_floor, action_space=args.action_space,
                    action_spread=args.action_spread)
    budget.check()
    x, y = eval_batch(splits, args.eval_batch, split="heldout", seed=args.seed)
    calibration, _ = eval_batch(splits, args.calibration, split="train", seed=args.seed)
    variants = list(itertools.product(LAYERS, METHODS)) if args.entropy_variants else [("bn_relu", "cooccurrence")]
    evaluators = {key: CandidateEvaluator(space, x, y, entropy_layers=key[0], method=key[1], sample=1.0,
                                          calibration=calibration) for key in variants}
    default = evaluators[("bn_relu", "cooccurrence")] if ("bn_relu", "cooccurrence") in evaluators else None
    rng = np.random.default_rng(args.seed)
    rows, seen = [], set()
    t0 = time.perf_counter()
    while len(rows) < args.candidates:
        counts = tuple(random_counts(budget, rng))
        if counts in seen:
            continue
        seen.add(counts)
        keep = space.counts_to_keep(counts)
        row: dict = {"kept_channels": list(counts)}
        for key, ev in evaluators.items():
            record = ev.evaluate(keep)
            row["entropy:" + "/".join(key)] = record["entropy"]
            if ev is default:
                row.update({k: record[k] for k in ("entropy", "accuracy", "kl", "feature_error", "agreement", "macs_ratio")})
                for reward in LABEL_FREE_REWARDS:
                    row["reward:" + reward] = compute_reward(reward, record)
        rows.append(row)
    measure_s = time.perf_counter() - t0
    order = sorted(range(len(rows)), key=lambda i: rows[i]["accuracy"])
    picks = [order[round(i * (len(order) - 1) / max(args.finetuned - 1, 1))] for i in range(args.finetuned)] if args.finetuned else []
    t1 = time.perf_counter()
    for i in dict.fromkeys(picks):
        rows[i]["finetuned"] = short_finetune_accuracy(space, space.counts_to_keep(rows[i]["kept_channels"]), splits,
                                                       calibration, args.finetune_steps, args.seed)
    tuned = [r for r in rows if "finetuned" in r]
    acc = [r["accuracy"] for r in rows]
    result = {
        "case": args.case or f"{ckpt.model_name}/{splits.name}@{args.flops_target:g}",
        "model": ckpt.model_name, "data": splits.name, "flops_target": args.flops_target, "flops_floor": args.flops_floor,
        "action_space": args.action_space, "action_spread": args.action_spread,
        "candidates": len(rows), "finetuned": len(tuned), "finetune_steps": args.finetune_steps,
        "eval_batch": len(x), "heldout_images": len(splits.heldout), "calibration": len(calibration),
        "macs_ratio": [min(r["macs_ratio"] for r in rows), max(r["macs_ratio"] for r in rows)],
        "collapsed": collapse_rate(acc, splits.num_classes),
        "measure_seconds": measure_s, "finetune_seconds": time.perf_counter() - t1,
        "vs_heldout": {}, "vs_finetuned": {},
        "accuracy_vs_finetuned": spearman([r["accuracy"] for r in tuned], [r["finetuned"] for r in tuned]),
    }
    for reward in LABEL_FREE_REWARDS:
        values = [r["reward:" + reward] for r in rows]
        result["vs_heldout"][reward] = spearman(values, acc)
        result["vs_finetuned"][reward] = spearman([r["reward:" + reward] for r in tuned], [r["finetuned"] for r in tuned])
    result["entropy_variants"] = {
        "/".join(key): {"vs_heldout": spearman([-r["entropy:" + "/".join(key)] for r in rows], acc),
                        "vs_finetuned": spearman([-r["entropy:" + "/".join(key)] for r in tuned],
                                                 [r["finetuned"] for r in tuned])}
        for key in variants
    }
    result["rows"] = rows
    return result


def report(result: dict) -> str:
    lines = [f"# {result['case']}: {result['candidates']} candidates drawn as the search draws them (MACs ratio "
             f"{result['macs_ratio'][0]:.3f}-{result['macs_ratio'][1]:.3f}, floor {result['flops_floor']}, "
             f"{result['action_space']} actions, spread {result['action_spread']:g}), "
             f"{result['collapsed']:.0%} collapsed (held-out accuracy < 2x chance); {result['finetuned']} fine-tuned "
             f"{result['finetune_steps']} steps; held-out batch {result['eval_batch']} of {result['heldout_images']} images",
             f"{'reward':<12}{'vs held-out':>12}{'vs fine-tuned':>15}"]
    for reward in LABEL_FREE_REWARDS:
        lines.append(f"{reward:<12}{fmt(result['vs_heldout'][reward]):>12}{fmt(result['vs_finetuned'][reward]):>15}")
    lines.append(f"{'(accuracy)':<12}{'':>12}{fmt(result['accuracy_vs_finetuned']):>15}")
    if len(result["entropy_variants"]) > 1:
        lines.append("entropy variants (minus entropy):")
        for key, v in result["entropy_variants"].items():
            lines.append(f"  {key:<24}{fmt(v['vs_heldout']):>12}{fmt(v['vs_finetuned']):>15}")
    return "\n".join(lines)


def row_reward(row: dict, reward: str) -> float:
    """A measured candidate's reward: as recorded, or computed from its measurements (a reward added since the
    case was measured, e.g. `agreement`, from the same candidates)."""
    return row["reward:" + reward] if "reward:" + reward in row else compute_reward(reward, row)


def choose(paths: list[str], threshold: float) -> int:
    """The protocol's step 4 on measured cases, its Spearman recomputed from each case's candidates."""
    cases = [json.loads(Path(p).read_text()) for p in paths]
    table = {c["case"]: {r: spearman([row_reward(row, r) for row in c["rows"]], [row["accuracy"] for row in c["rows"]])
                         for r in LABEL_FREE_REWARDS} for c in cases}
    print(f"{'reward':<20}" + "".join(f"{c:>28}" for c in table) + f"{'worst':>8}")
    for reward in LABEL_FREE_REWARDS:
        vals = [table[c].get(reward) for c in table]
        worst = min((v for v in vals if v is not None), default=None)
        print(f"{reward:<20}" + "".join(f"{fmt(v):>28}" for v in vals) + f"{fmt(worst):>8}")
    chosen = choose_default_reward(table, threshold=threshold)
    print(f"\ndefault reward by the protocol (Spearman >= {threshold} on every case): {chosen or 'none qualifies'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint")
    parser.add_argument("--data", default=None, help="default: the checkpoint's")
    parser.add_argument("--case", default=None, help="name of the development case")
    parser.add_argument("--flops-target", type=float, default=0.5)
    parser.add_argument("--flops-floor", type=float, default=0.9)
    parser.add_argument("--min-keep", type=float, default=0.1)
    parser.add_argument("--action-space", choices=("absolute", "relative"), default="absolute")
    parser.add_argument("--action-spread", type=float, default=1.0)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--finetuned", type=int, default=12, help="candidates also fine-tuned briefly (evenly spread)")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--eval-batch", type=int, default=256)
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--entropy-variants", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file of the case's result")
    parser.add_argument("--choose", nargs="+", metavar="CASE_JSON", help="apply the protocol to measured cases")
    parser.add_argument("--threshold", type=float, default=0.6)
    args = parser.parse_args(argv)
    if args.choose:
        return choose(args.choose, args.threshold)
    if not args.checkpoint:
        parser.error("--checkpoint is required (or --choose)")
    result = measure(args)
    print(report(result), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
