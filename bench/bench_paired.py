"""Can the final stage see what the test split sees? Per image, each finalist's correctness minus uniform pruning's,
on the held-out images (what the final stage judges by) and on the test split (what the quality tables report), from
the fine-tuned finalists a search saved (`<output.dir>/finalists/<label>.pt`). Over several searches of the same
case (seeds), the per-image differences are averaged over the seeds first: every seed is judged on the same images,
so the standard error of the seeds' mean gap is the spread over images, not over seeds.

    PYTHONPATH=. python bench/bench_paired.py runs/quality/fashion30/latency0.5-agreement-s{0,1,2}

Prints, per split and finalist: the mean gap to uniform pruning (points), its standard error over images and z.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from entropy_search.config import load_config
from entropy_search.finalists import FinalistStore
from entropy_search.problem.setup import setup
from entropy_search.rl.rundir import FINALISTS_DIR

SPLITS = ("heldout", "test")


def correct(network: torch.nn.Module, images) -> torch.Tensor:
    """Per-image correctness (bool) of the network's top-1 prediction, in the split's order."""
    with torch.no_grad():
        return torch.cat([network(x).argmax(1) == y for x, y in DataLoader(images, batch_size=500)])


def gaps(run: Path, labels: list[str]) -> dict[tuple[str, str], torch.Tensor]:
    """{(split, label): per-image correctness minus uniform pruning's} of one search's saved finalists."""
    problem = setup(load_config(str(run / "config.yaml")))
    store = FinalistStore(run / FINALISTS_DIR)  # the fine-tuned finalists, read back as a resumed search reads them
    out = {}
    for split in SPLITS:
        images = getattr(problem.splits, split)
        reference = correct(store.load("uniform", problem.space)[1], images).float()
        for label in labels:
            if (kept := store.load(label, problem.space)) is not None:
                out[split, label] = correct(kept[1], images).float() - reference
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="search output folders of one case (one per seed)")
    parser.add_argument("--labels", nargs="+", default=["top1", "random", "uniform_shallow", "tp_taylor"],
                        help="finalists to compare with uniform pruning")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pooled: dict[tuple[str, str], list[torch.Tensor]] = {}
    for run in args.runs:
        for key, gap in gaps(run, args.labels).items():
            pooled.setdefault(key, []).append(gap)
            print(f"{run.name} {key[0]:7} {key[1]:16} {100 * gap.mean():+.2f} points "
                  f"(SE {100 * gap.std() / math.sqrt(len(gap)):.2f}, {len(gap)} images)")
    print(f"\nMean over {len(args.runs)} searches, per image first:")
    for (split, label), per_seed in pooled.items():
        gap = torch.stack(per_seed).mean(0)
        error = gap.std() / math.sqrt(len(gap))
        print(f"{split:7} {label:16} {100 * gap.mean():+.2f} points, SE {100 * error:.2f}, z {gap.mean() / error:+.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
