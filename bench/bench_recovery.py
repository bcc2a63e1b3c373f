"""Which measurement of a candidate predicts its accuracy after the full fine-tune? Over the finalists of finished
`bench_quality.py` searches (uniform pruning, the agents' picks, random search's best: each has a test accuracy
after the full fine-tune in its result.json), measure, on the held-out split (never the test split):

- `zero_shot`: top-1 agreement with the unpruned network after adaptive BN (what the default reward measures);
- `distilled`: the same agreement after `--steps` SGD steps of label-free distillation (KL divergence to the
  unpruned network's softmax on training images; no labels);
- `short_finetune`: accuracy on the whole held-out split after `--steps` labelled SGD steps (batch 128, lr 0.01),
  `bench_proxy.short_finetune_accuracy`, the protocol's short fine-tune (`entropy_search.train.train`);
- `heldout_after_finetune`: the final stage's own judge, from result.json;

and print each one's Spearman rank correlation with the test accuracy after the full fine-tune. A finalist that
appears in several searches of one seed (same kept channels) counts once.

    python bench/bench_recovery.py --runs /work/runs_f/q40 --target 0.1 --steps 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_proxy import short_finetune_accuracy  # this folder's scripts: the protocol's short fine-tune,
from bench_quality import finalists  # and the final stage's finalists of one result.json
from scipy.stats import spearmanr

from entropy_search.data import eval_batch, load_data
from entropy_search.problem import PruningSpace, build_model, load_checkpoint, recalibrate_batchnorm

MEASURES = ("zero_shot", "distilled", "short_finetune", "heldout_after_finetune")


def distinct_finalists(run_dirs: list[Path], target: float) -> list[dict]:
    """The fine-tuned finalists of every search at `target` under `run_dirs` (bench_quality's layout), once per
    seed and kept channels."""
    rows, seen = [], set()
    for root in run_dirs:
        for path in sorted((root / f"t{target:g}").glob("*/result.json")):
            result = json.loads(path.read_text())
            seed = result["config"]["seed"]
            for label, final in finalists(result).items():
                if (seed, tuple(final["kept_channels"])) in seen:
                    continue
                seen.add((seed, tuple(final["kept_channels"])))
                rows.append({"search": f"{root.name}/{path.parent.name}", "finalist": label, "seed": seed,
                             "checkpoint": result["config"]["model"]["checkpoint"],
                             "keep": final["keep"], "macs_ratio": final["macs_ratio"],
                             "test_after_finetune": final["test_accuracy_after_finetune"],
                             "heldout_after_finetune": final["heldout_accuracy_after_finetune"]})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="bench_quality output folders")
    parser.add_argument("--target", type=float, required=True, help="the FLOPs target whose finalists to measure")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the searches' model.checkpoint")
    parser.add_argument("--steps", type=int, default=200, help="SGD steps of distillation and of the short fine-tune")
    parser.add_argument("--heldout", type=int, default=2048, help="held-out images measured")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="JSON file of the rows and correlations")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = distinct_finalists(args.runs, args.target)
    if len(rows) < 3:
        print(f"error: {len(rows)} finalists at target {args.target:g} under {', '.join(map(str, args.runs))}; need 3", file=sys.stderr)
        return 2
    checkpoint = args.checkpoint or Path(rows[0]["checkpoint"])
    ckpt = load_checkpoint(checkpoint)
    config = ckpt.config or {}
    splits = load_data(ckpt.data, seed=int(config.get("seed", 0)),
                       heldout_fraction=float(config.get("heldout_fraction", 0.1)))
    teacher = build_model(ckpt).eval()
    space = PruningSpace(teacher, ckpt.example_input())
    calibration, _ = eval_batch(splits, 256, split="train", seed=0)
    hx, _ = eval_batch(splits, args.heldout, split="heldout", seed=0)
    order = np.random.default_rng(0).permutation(len(splits.train))[: args.steps * 128]
    tx = torch.stack([splits.train[int(i)][0] for i in order])
    with torch.no_grad():
        teacher_logits = torch.cat([teacher(tx[i:i + 512]) for i in range(0, len(tx), 512)])
        teacher_top1 = torch.cat([teacher(hx[i:i + 512]) for i in range(0, len(hx), 512)]).argmax(1)

    def heldout_top1(model: torch.nn.Module) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return torch.cat([model(hx[i:i + 512]) for i in range(0, len(hx), 512)]).argmax(1)

    def distilled_top1(keep: list[float]) -> torch.Tensor:
        """Held-out top-1 after `--steps` SGD steps of label-free distillation from the unpruned network."""
        torch.manual_seed(0)
        model = space.prune(keep)
        recalibrate_batchnorm(model, calibration)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for step in range(args.steps):
            batch = slice(step * 128, (step + 1) * 128)
            loss = F.kl_div(F.log_softmax(model(tx[batch]), 1), F.softmax(teacher_logits[batch], 1),
                            reduction="batchmean")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return heldout_top1(model)

    for row in rows:
        t0 = time.perf_counter()
        model = space.prune(row["keep"])
        recalibrate_batchnorm(model, calibration)
        row["zero_shot"] = float((heldout_top1(model) == teacher_top1).float().mean())
        row["distilled"] = float((distilled_top1(row["keep"]) == teacher_top1).float().mean())
        row["short_finetune"] = short_finetune_accuracy(space, row["keep"], splits, calibration, args.steps, seed=0)
        print(f"{row['search']}:{row['finalist']} seed {row['seed']}: MACs {row['macs_ratio']:.3f} zero-shot "
              f"{row['zero_shot']:.3f} distilled {row['distilled']:.3f} short fine-tune {row['short_finetune']:.3f} "
              f"held-out/test after fine-tune {100 * row['heldout_after_finetune']:.2f}/"
              f"{100 * row['test_after_finetune']:.2f}% ({time.perf_counter() - t0:.0f} s)", flush=True)
    test = [row["test_after_finetune"] for row in rows]
    correlations = {m: float(spearmanr([row[m] for row in rows], test).statistic) for m in MEASURES}
    print(f"\n{len(rows)} finalists at target {args.target:g}, {args.steps} steps: Spearman with test accuracy after the "
          "full fine-tune: " + ", ".join(f"{m} {v:+.2f}" for m, v in correlations.items()))
    if args.out:
        args.out.write_text(json.dumps({"target": args.target, "steps": args.steps, "rows": rows,
                                        "spearman_vs_test_after_finetune": correlations}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
