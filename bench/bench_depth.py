"""Would a space that also removes residual blocks find room above uniform pruning where channels alone find none?

bench_headroom.py measured that at 10x on ResNet-20 / Fashion-MNIST no channel allocation of the search's space
beats uniform pruning after the protocol's fine-tune. This study asks the next question before any search is
built for it: at the same MACs, does a shallower network of wider layers recover better? Each `--variants`
entry `a-b-c` drops the last a, b, c blocks of the network's stages (`layer1`, `layer2`, ... as torchvision and
the registry's CIFAR ResNets name them; a stage's first block, which may change the shape, is never dropped) by
replacing them with the identity, which is what a residual block with an identity shortcut computes without its
branch. The shallower network is then pruned uniformly (the search's own `uniform_counts`, same rounding, floor
and `min_keep`) to `search.flops_target` of the *full* network's MACs, and gets the protocol's full fine-tune
(`finalize`, the search's own) for `--seeds` fine-tune seeds. `0-0-0` is uniform pruning itself.
Every fine-tuned network is written to `--out` as it finishes; the test split is only reported.

Fewer layers also run faster at the same MACs. `--latency` times each variant against the unpruned network
(CPU, 1 thread); with `--equal-latency` it first widens each shallower variant until it is as slow at batch 1 as
full-depth uniform pruning and writes those keep ratios, which `--keep-from` then fine-tunes: a comparison at
equal latency, where the shallower networks have more MACs.

    python bench/bench_depth.py --set model.checkpoint=CKPT --set search.flops_target=0.1 --out d.json
    python bench/bench_depth.py --report d.json
    python bench/bench_depth.py --set model.checkpoint=CKPT --set search.flops_target=0.1 --latency --equal-latency --out keep.json
    python bench/bench_depth.py --set model.checkpoint=CKPT --set search.flops_target=0.1 --keep-from keep.json --out e.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
from bench_headroom import (  # this folder: a study's options and figures,
    accuracy_or_na,
    add_row,
    percent,
    run_study,
    study_arguments,
    study_device,
)
from bench_quality import PRESETS  # and the setting the quality tables search
from torch import nn

from entropy_search.commands.search import parse_overrides
from entropy_search.config import load_config
from entropy_search.errors import EntropySearchError
from entropy_search.jsonio import write_json
from entropy_search.latency import device_name, interleaved_latency
from entropy_search.problem import (
    Budget,
    Problem,
    PruningSpace,
    ensure_checkpoint,
    finalize,
    setup,
    uniform_counts,
)
from entropy_search.problem.blocks import find_blocks, remove_blocks
from entropy_search.utils import environment_info


def stages(model: nn.Module) -> list[nn.Sequential]:
    """The residual stages `layer1`, `layer2`, ... of a ResNet, in order."""
    found = []
    while isinstance(getattr(model, f"layer{len(found) + 1}", None), nn.Sequential):
        found.append(getattr(model, f"layer{len(found) + 1}"))
    if not found:
        raise EntropySearchError(f"{type(model).__name__} has no residual stages named layer1, layer2, ...")
    return found


def drop_blocks(model: nn.Module, example_input: torch.Tensor, per_stage: list[int]) -> nn.Module:
    """A copy of `model` with the last `per_stage[s]` blocks of stage s replaced by the identity; a block the
    pruning space does not offer as a residual block (found from the graph: `find_blocks`) is refused, saying why."""
    parts = stages(model)
    if len(per_stage) != len(parts):
        raise EntropySearchError(f"a variant names {len(per_stage)} stages; the network has {len(parts)}")
    for s, (stage, k) in enumerate(zip(parts, per_stage)):
        if not 0 <= k < len(stage):
            raise EntropySearchError(f"stage layer{s + 1} has {len(stage)} blocks: can drop 0 to {len(stage) - 1}, not {k}")
    names = [f"layer{s + 1}.{i}" for s, (stage, k) in enumerate(zip(parts, per_stage)) for i in range(len(stage) - k, len(stage))]
    offered, reasons = find_blocks(model, example_input)
    offered_names = {b.name for b in offered}
    for name in names:
        if name not in offered_names:
            raise EntropySearchError(f"cannot drop {name}: {name} {reasons.get(name, 'is not a residual block')}")
    return remove_blocks(copy.deepcopy(model), names)


def parse_variant(text: str) -> list[int]:
    parts = text.split("-")
    if not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected blocks dropped per stage as a-b-c, got {text!r}")
    return [int(p) for p in parts]


def checked_variant(text: str) -> str:
    parse_variant(text)
    return text


def variant_space(problem: Problem, variant: str) -> tuple[PruningSpace, Budget]:
    """The channel groups of `variant`'s shallower network, and its budget: the search's `flops_target` of the
    *full* network's MACs (same `min_keep`, floor and rounding)."""
    s = problem.config.search
    shallow = drop_blocks(problem.model, problem.network.example_input, parse_variant(variant))
    space = PruningSpace(shallow, problem.network.example_input, round_to=s.round_to)
    budget = Budget(space, s.flops_target * problem.space.base_macs / space.base_macs, s.min_keep, s.flops_floor)
    budget.check()
    return space, budget


def uniform_variant(problem: Problem, variant: str, keep: float | None = None) -> tuple[PruningSpace, float, list[int]]:
    """`variant`'s space and its uniform pruning (ratio, counts): to the budget, or at the ratio `keep` when given."""
    space, budget = variant_space(problem, variant)
    if keep is not None:
        return space, keep, budget.counts_at(keep)
    ratio, counts = uniform_counts(budget)
    return space, ratio, counts


def pruned(space: PruningSpace, counts: list[int]) -> nn.Module:
    return space.prune(space.counts_to_keep(counts)).cpu()


def batch1_ms(models: list[nn.Module], example_input: torch.Tensor, rounds: int) -> list[float]:
    return [t["ms"]["1"] for t in interleaved_latency(models, example_input, batch_sizes=(1,), rounds=rounds)]


def equal_latency_keep(problem: Problem, variant: str, reference: nn.Module, *, rounds: int, steps: int = 8) -> float:
    """The largest uniform keep ratio of `variant` whose pruned network is no slower at batch 1 than `reference`
    (bisection from the MAC-matched ratio, each step timed interleaved with the reference)."""
    x = problem.network.example_input.cpu()
    space, budget = variant_space(problem, variant)
    lo, hi = uniform_counts(budget)[0], 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        ref_ms, ms = batch1_ms([reference, pruned(space, budget.counts_at(mid))], x, rounds)
        lo, hi = (mid, hi) if ms <= ref_ms else (lo, mid)
    return lo


def study_problem(args) -> Problem:
    """The pruning problem of the study's config (the `fashion` preset under --set), its baseline trained when
    missing."""
    config = load_config(None, parse_overrides(PRESETS["fashion"]["overrides"] + args.set))
    ensure_checkpoint(config, progress=False)
    return setup(config)


def latencies(args) -> str:
    """Each variant's pruned network timed against the unpruned one on this machine's CPU, 1 thread, interleaved
    (latency does not depend on the weights, so no fine-tune is needed). With `--equal-latency`, first find each
    variant's keep ratio at full-depth uniform pruning's batch-1 latency and write them to --out."""
    problem = study_problem(args)
    config = problem.config
    torch.set_num_threads(1)
    full_depth = "-".join("0" * len(stages(problem.model)))
    space, _, counts = uniform_variant(problem, full_depth)
    reference = pruned(space, counts)
    keeps = {}
    if args.equal_latency:
        keeps = {v: equal_latency_keep(problem, v, reference, rounds=args.rounds) for v in args.variants if v != full_depth}
        write_json(args.out, {"reference": full_depth, "flops_target": config.search.flops_target, "keep": keeps,
                              "device": device_name("cpu")})
    networks = {"unpruned": (problem.model.cpu(), problem.space.base_macs, 1.0)}
    for variant in args.variants:
        space, ratio, counts = uniform_variant(problem, variant, keeps.get(variant))
        networks[variant] = (pruned(space, counts), space.macs_of_counts(counts), ratio)
    times = interleaved_latency([m for m, _, _ in networks.values()], problem.network.example_input.cpu(), rounds=args.rounds)
    base = times[0]["ms"]
    lines = [f"{config.model.name} at flops_target {config.search.flops_target:g}"
             f"{' (shallower variants at full-depth pruning latency)' if keeps else ''}: median ms per forward, 1 thread, "
             f"{args.rounds} interleaved rounds, {device_name('cpu')}",
             "| network | uniform keep | MACs ratio | batch 1 (ms) | batch 32 (ms) | speed-up batch 1 | speed-up batch 32 |",
             "|---|---|---|---|---|---|---|"]
    for (name, (_, macs, ratio)), timed in zip(networks.items(), times):
        ms = timed["ms"]
        keep = "1" if name == "unpruned" else f"{ratio:.3f}"
        lines.append(f"| {name} | {keep} | {macs / problem.space.base_macs:.3f} | {ms['1']:.3f} | {ms['32']:.3f} "
                     f"| {base['1'] / ms['1']:.2f}x | {base['32'] / ms['32']:.2f}x |")
    return "\n".join(lines)


def measure(args) -> dict:
    problem = study_problem(args)
    config = problem.config
    full_macs = problem.space.base_macs
    result = {"config": config.to_dict(), "environment": environment_info(), "variants": args.variants,
              "base_test_accuracy": problem.network.checkpoint.metrics.get("test_acc"), "rows": []}
    keeps = json.loads(args.keep_from.read_text())["keep"] if args.keep_from else {}
    result.update(keep_from=str(args.keep_from) if args.keep_from else None, equal_latency_keep=keeps)
    queue = [(v, config.seed + i) for i in range(args.seeds) for v in args.variants]
    shard, shards = args.shard
    for variant, seed in queue[shard::shards]:
        space, ratio, counts = uniform_variant(problem, variant, keeps.get(variant))
        measured, _ = finalize(space, problem.splits, space.counts_to_keep(counts), finetune=config.finetune,
                               calibration=problem.evaluator.calibration, seed=seed, progress=False)
        row = add_row(result, args.out, measured, variant=variant, finetune_seed=seed, uniform_keep=ratio,
                      macs=measured["macs"], macs_ratio=measured["macs"] / full_macs)
        print(f"{variant:8s} seed {seed} keep {ratio:.3f} MACs {row['macs_ratio']:.3f} (exact: {row['analytic_macs_match']}) "
              f"test before FT {100 * row['test_accuracy_before_finetune']:.2f} held-out after FT "
              f"{100 * row['heldout_accuracy_after_finetune']:.2f} test {100 * row['test_accuracy_after_finetune']:.2f} "
              f"({row['finetune_seconds']:.0f} s)", flush=True)
    return result


def report(results: list[dict]) -> str:
    """The table of one study from its shards' files (of one run or several on the same baseline and target): each
    variant's mean ± std over fine-tune seeds, and its difference from the full-depth variant (uniform pruning)
    on test."""
    result = results[0]
    rows = [{**row, "label": _label(row["variant"], r)} for r in results for row in r["rows"]]
    config = result["config"]
    lines = [f"{config['model']['name']} / {config['data']['name']} at flops_target {config['search']['flops_target']:g} "
             f"of the full network's MACs, baseline {accuracy_or_na(result.get('base_test_accuracy'))} "
             f"({config['model']['checkpoint']}), {config['finetune']['epochs']} fine-tune epochs on {study_device(result)}",
             "| blocks dropped per stage | n | uniform keep | MACs ratio | exact MACs | test before FT (%) "
             "| held-out after FT (%) | test after FT (%) | minus full depth on test |",
             "|---|---|---|---|---|---|---|---|---|"]
    full = [r["test_accuracy_after_finetune"] for r in rows if set(parse_variant(r["variant"])) == {0}]
    labels = list(dict.fromkeys(_label(v, r) for r in results for v in r.get("variants", [])))  # several runs too
    for label in labels:
        group = [r for r in rows if r["label"] == label]
        if not group:
            continue
        test = [r["test_accuracy_after_finetune"] for r in group]
        diff = f"{100 * (statistics.fmean(test) - statistics.fmean(full)):+.2f}" if full else "n/a"
        lines.append(f"| {label} | {len(group)} | {statistics.fmean(r['uniform_keep'] for r in group):.3f} "
                     f"| {statistics.fmean(r['macs_ratio'] for r in group):.3f} "
                     f"| {all(r['analytic_macs_match'] for r in group)} "
                     f"| {percent([r['test_accuracy_before_finetune'] for r in group])} "
                     f"| {percent([r['heldout_accuracy_after_finetune'] for r in group])} | {percent(test)} | {diff} |")
    return "\n".join(lines)


def _label(variant: str, result: dict) -> str:
    """A variant as the report names it: pruned to the full network's MACs, or to the latency an --equal-latency
    run matched (then its MACs are larger)."""
    return f"{variant} at equal latency" if variant in result.get("equal_latency_keep", {}) else variant


def main(argv=None) -> int:
    parser = study_arguments(__doc__, "depth.json")
    parser.add_argument("--variants", nargs="+", type=checked_variant, default=["0-0-0", "1-1-1", "2-2-2"], metavar="A-B-C",
                        help="blocks dropped at the end of each stage; 0-0-0 is uniform pruning of the full network")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tune seeds per variant (seed, seed+1, ...)")
    parser.add_argument("--latency", action="store_true",
                        help="time each variant's pruned network against the unpruned one instead (CPU, 1 thread)")
    parser.add_argument("--rounds", type=int, default=5, help="with --latency: interleaved rounds")
    parser.add_argument("--equal-latency", action="store_true",
                        help="with --latency: prune each variant to full-depth uniform pruning's batch-1 latency instead "
                             "of its MACs, and write the keep ratios to --out")
    parser.add_argument("--keep-from", type=Path, metavar="JSON",
                        help="fine-tune each variant at the keep ratio an --equal-latency run wrote (full depth: its MACs)")
    args = parser.parse_args(argv)
    if args.latency:
        print(latencies(args))
        return 0
    return run_study(args, measure, report)


if __name__ == "__main__":
    sys.exit(main())
