"""How much room is there above uniform pruning at a target? A sample of what any search there can gain.

Draws `--candidates` candidates as the search's random baseline draws them (the config's action space,
floor and rounding), measures each as the search does (held-out batch, adaptive BN, the config's
reward), then gives the protocol's full fine-tune (`finalize`, the search's own) to uniform pruning
(`--uniform-seeds` fine-tune seeds, for the fine-tune's own spread), the `--top` candidates with the
highest reward and `--random` others, interleaved so a run stopped by `--deadline` is still balanced.
Every fine-tuned candidate is written to `--out` as it finishes. The test split is only reported.

    python bench/bench_headroom.py --set model.checkpoint=CKPT --set search.flops_target=0.1 --out h.json
    python bench/bench_headroom.py --report h.json

A missing checkpoint is trained first (`model.train_epochs`), as a search would.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from bench_proxy import spearman  # this folder's scripts: the protocol's rank correlation,
from bench_quality import PRESETS  # and the setting the quality tables search

from entropy_search.commands.search import parse_overrides
from entropy_search.config import load_config
from entropy_search.jsonio import write_json
from entropy_search.problem import ensure_checkpoint, finalize, random_counts, setup, uniform_baseline
from entropy_search.utils import environment_info


def finetune_queue(uniform: dict, drawn: list[dict], *, top: int, random: int, uniform_seeds: int, seed: int,
                   rng: np.random.Generator) -> list[tuple[str, dict, int]]:
    """(kind, record, fine-tune seed) in fine-tune order: uniform pruning once per seed (seed, seed+1, ...),
    then the `top` highest-reward candidates alternating with `random` of the others, each fine-tuned with
    `seed` as the search fine-tunes its finalists."""
    by_reward = sorted(drawn, key=lambda r: -r["reward"])
    best = by_reward[:top]
    rest = by_reward[top:]
    picks = [rest[i] for i in rng.permutation(len(rest))[:random]]
    queue = [("uniform", uniform, seed + i) for i in range(uniform_seeds)]
    for i in range(max(len(best), len(picks))):
        queue += [("top", r, seed) for r in best[i:i + 1]] + [("random", r, seed) for r in picks[i:i + 1]]
    return queue


def measure(args) -> dict:
    started = time.perf_counter()
    config = load_config(None, parse_overrides(PRESETS["fashion"]["overrides"] + args.set))
    t0 = time.perf_counter()
    ensure_checkpoint(config, progress=False)
    baseline_seconds = time.perf_counter() - t0
    problem = setup(config)
    space, budget = problem.space, problem.budget
    rng = np.random.default_rng(config.seed + 1)
    drawn: dict[tuple[int, ...], dict] = {}
    t0 = time.perf_counter()
    for _ in range(20 * args.candidates):
        if len(drawn) >= args.candidates:
            break
        counts = tuple(random_counts(budget, rng))
        if counts not in drawn:
            drawn[counts] = problem.evaluate(counts)[0]
    measure_seconds = time.perf_counter() - t0
    uniform = uniform_baseline(budget, lambda counts: problem.evaluate(counts)[0])["best"]
    queue = finetune_queue(uniform, list(drawn.values()), top=args.top, random=args.random,
                           uniform_seeds=args.uniform_seeds, seed=config.seed, rng=rng)
    shard, shards = args.shard
    queue = queue[shard::shards]
    result = {
        "config": config.to_dict(), "environment": environment_info(),
        "baseline_seconds": baseline_seconds, "measure_seconds": measure_seconds, "candidates": len(drawn),
        "base_test_accuracy": problem.network.checkpoint.metrics.get("test_acc"),
        "reward": config.search.reward, "rows": [],
        "rewards_drawn": [r["reward"] for r in drawn.values()],
    }
    start = time.perf_counter()
    for i, (kind, record, seed) in enumerate(queue):
        if args.deadline and time.perf_counter() - started > args.deadline:
            result["stopped_by_deadline"] = len(queue) - i
            break
        measured, _ = finalize(space, problem.splits, record["keep"], finetune=config.finetune,
                               calibration=problem.evaluator.calibration, seed=seed, progress=False)
        row = add_row(result, args.out, measured, kind=kind, finetune_seed=seed, reward=record["reward"],
                      heldout_accuracy=record["accuracy"], macs_ratio=measured["macs_ratio"])
        print(f"{kind:8s} reward {row['reward']:.4f} MACs {row['macs_ratio']:.3f} held-out after FT "
              f"{100 * row['heldout_accuracy_after_finetune']:.2f} test {100 * row['test_accuracy_after_finetune']:.2f} "
              f"({row['finetune_seconds']:.0f} s)", flush=True)
    result["finetune_seconds"] = time.perf_counter() - start
    write_json(args.out, result)
    return result


FINETUNE_FIELDS = ("kept_channels", "analytic_macs_match", "finetune_seconds", "test_accuracy_before_finetune",
                   "heldout_accuracy_after_finetune", "test_accuracy_after_finetune")
"""What a study's row keeps of `finalize`'s measurements."""


def add_row(result: dict, out: Path, measured: dict, **fields) -> dict:
    """Append a fine-tuned network's row (`fields`, then `FINETUNE_FIELDS` of its measurements) to the study's
    result and write the result at once, so a stopped study keeps every finished fine-tune."""
    row = {**fields, **{k: measured[k] for k in FINETUNE_FIELDS}}
    result["rows"].append(row)
    write_json(out, result)
    return row


def report(results: list[dict]) -> str:
    """The table of one study, from the result files of its shards (the same candidates, different fine-tunes)."""
    result = results[0]
    rows = [row for r in results for row in r["rows"]]
    uniform = [r for r in rows if r["kind"] == "uniform"]
    others = [r for r in rows if r["kind"] != "uniform"]
    if not uniform or not others:
        return "not enough fine-tuned candidates for a report"

    config = result["config"]
    test_u = statistics.fmean(r["test_accuracy_after_finetune"] for r in uniform)
    held_u = statistics.fmean(r["heldout_accuracy_after_finetune"] for r in uniform)
    lines = [f"{config['model']['name']} / {config['data']['name']} at flops_target {config['search']['flops_target']:g}, "
             f"baseline {accuracy_or_na(result.get('base_test_accuracy'))} "
             f"({config['model']['checkpoint']}), reward {result['reward']}, {result['candidates']} candidates drawn, "
             f"{len(others)} fine-tuned for {config['finetune']['epochs']} epochs on {study_device(result)}",
             "| candidates | n | MACs ratio | reward | held-out after FT (%) | test after FT (%) |", "|---|---|---|---|---|---|"]
    for kind in ("uniform", "top", "random"):
        group = [r for r in rows if r["kind"] == kind]
        if group:
            lines.append(f"| {kind} | {len(group)} | {statistics.fmean(r['macs_ratio'] for r in group):.3f} "
                         f"| {statistics.fmean(r['reward'] for r in group):.4f} "
                         f"| {percent([r['heldout_accuracy_after_finetune'] for r in group])} "
                         f"| {percent([r['test_accuracy_after_finetune'] for r in group])} |")
    best_test = max(others, key=lambda r: r["test_accuracy_after_finetune"])
    best_held = max(others, key=lambda r: r["heldout_accuracy_after_finetune"])
    lines += [
        f"best candidate on test minus uniform's mean: {100 * (best_test['test_accuracy_after_finetune'] - test_u):+.2f} points "
        f"({best_test['kind']}); candidates >= 0.5 above uniform on test: "
        f"{sum(r['test_accuracy_after_finetune'] - test_u >= 0.005 for r in others)} of {len(others)}",
        f"best candidate on held-out after FT: {100 * (best_held['heldout_accuracy_after_finetune'] - held_u):+.2f} points "
        f"above uniform there, {100 * (best_held['test_accuracy_after_finetune'] - test_u):+.2f} on test",
        f"Spearman over the fine-tuned candidates: reward vs held-out after FT "
        f"{_fmt(spearman([r['reward'] for r in others], [r['heldout_accuracy_after_finetune'] for r in others]))}, "
        f"held-out after FT vs test after FT "
        f"{_fmt(spearman([r['heldout_accuracy_after_finetune'] for r in others], [r['test_accuracy_after_finetune'] for r in others]))}",
    ]
    left = sum(r.get("stopped_by_deadline", 0) for r in results)
    if left:
        lines.append(f"stopped by --deadline with {left} fine-tunes left")
    return "\n".join(lines)


def study_device(result: dict) -> str:
    """Where a study's fine-tunes ran, from its environment record: the GPU's name, or cpu."""
    cuda = result["environment"]["cuda"]
    return "cpu" if cuda == "none" else cuda


def accuracy_or_na(value: float | None) -> str:
    """One accuracy in percent, or n/a when it was not recorded."""
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def percent(values: list[float]) -> str:
    """Mean ± std of accuracies in percent (the mean alone for one value)."""
    mean = 100 * statistics.fmean(values)
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def parse_shard(text: str) -> tuple[int, int]:
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise argparse.ArgumentTypeError(f"expected K/N with 0 <= K < N, got {text!r}")
    return int(k), int(n)


def study_arguments(description: str, out: str) -> argparse.ArgumentParser:
    """The options every fine-tuning study of this folder shares: config overrides over the `fashion` preset,
    shards, the output file and the report of finished shards."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="search config overrides, over bench_quality's `fashion` preset (ResNet-20 / Fashion-MNIST, "
                             "5 fine-tune epochs, a 2-epoch baseline when the checkpoint is missing)")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="K/N",
                        help="fine-tune only every N-th network of the queue from the K-th (K = 0..N-1), so N "
                             "processes share the work (or one GPU); --report merges their files")
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--report", type=Path, nargs="+", metavar="JSON", help="print the report of one study from its shards' files")
    return parser


def run_study(args: argparse.Namespace, measure: Callable[[argparse.Namespace], dict],
              report: Callable[[list[dict]], str]) -> int:
    """Print the report of the shards' files named by --report, or measure (writing --out as it goes) and report."""
    print(report([json.loads(p.read_text()) for p in args.report] if args.report else [measure(args)]))
    return 0


def main(argv=None) -> int:
    parser = study_arguments(__doc__, "headroom.json")
    parser.add_argument("--candidates", type=int, default=200, help="candidates drawn and measured zero-shot")
    parser.add_argument("--top", type=int, default=8, help="fine-tuned: the highest-reward candidates")
    parser.add_argument("--random", type=int, default=8, help="fine-tuned: other drawn candidates, at random")
    parser.add_argument("--uniform-seeds", type=int, default=2, help="fine-tunes of uniform pruning (seeds seed, seed+1...)")
    parser.add_argument("--deadline", type=float, default=None, help="seconds after the start (baseline training included) after which no new fine-tune starts")
    return run_study(parser.parse_args(argv), measure, report)


if __name__ == "__main__":
    sys.exit(main())
