"""The quality tables: every method at the same budget after the same fine-tune, over seeds, one row per method,
budget and seed, written as it finishes and never lost to an interruption.

For each budget (`macs:0.1`: 10x fewer MACs; `latency:0.5`: half the unpruned network's batch-1 latency on this
machine) and seed, one `entropy-search search` with the shipped defaults but for the preset's settings runs in its
own process and folder; it is resumable itself (`--resume` continues it after a kill). Its result gives a row for
each method it fine-tuned the same way: the network it delivered, the agent's pick, random search, uniform
pruning, uniform pruning without blocks, and each of Torch-Pruning's recipes. Every row also gets the network's
measured batch-1 latency, timed interleaved with the unpruned network's (`LatencyMeter`, one thread, as the
latency budget does), and the delivered row the wall time to the delivered network, next to uniform pruning's
prune + fine-tune timed alone on the same machine (`entropy-search prune`, its own row, `uniform_cli`).

Rows go to OUT/rows.jsonl (default bench/quality/<preset>/, committed as they come); a row already there is not
run again, so the same command continues an interrupted benchmark. The tables are printed from whatever finished.

    python bench/bench_quality.py --preset fashion30                        # 10x, 5x; latency 0.4, 0.5, 0.33; seeds 0-2
    python bench/bench_quality.py --preset fashion30 --budgets macs:0.1 --seeds 0
    python bench/bench_quality.py --preset fashion30 --report-only          # the tables of what has finished
    python bench/bench_quality.py --preset digits --rewards entropy agreement accuracy

`fashion30` starts from the converged baseline committed under bench/baselines/ (30 epochs) and fine-tunes every
network for 3 epochs, 10% of its training; `fashion` reproduces the earlier tables (a 2-epoch baseline given with
--checkpoint, 5 fine-tune epochs).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from entropy_search.commands.search import parse_overrides
from entropy_search.config import load_config
from entropy_search.jsonio import read_jsonl
from entropy_search.models import create_model
from entropy_search.problem import (
    PEER_RECIPES,
    LatencyMeter,
    PruningSpace,
    guarded_winner,
    load_checkpoint,
    setup,
)
from entropy_search.summary import agent_pick, delivered_network

ROOT = Path(__file__).resolve().parent.parent


def fastnas_unavailable() -> str | None:
    """Why FastNAS cannot run here (None: it can): Model Optimizer is an optional extra."""
    from fastnas_peer import available  # this folder

    return available()

PRESETS: dict[str, dict] = {
    # the offline default: digits CNN, 2x FLOPs reduction, 25 PPO iterations x 16 candidates, 10 fine-tune epochs
    "digits": {
        "budgets": ["macs:0.5"],
        "overrides": ["model.name=digits_cnn", "data.name=digits", "stop.iterations=25", "finetune.epochs=10"],
    },
    # ResNet-20 on Fashion-MNIST (Debian's dataset-fashion-mnist) from a 2-epoch baseline (given with
    # --checkpoint), the earlier tables' setting: 5 fine-tune epochs
    "fashion": {
        "budgets": ["macs:0.33", "macs:0.2", "macs:0.1"],
        "overrides": ["model.name=resnet20", "data.name=fashion_mnist", "data.eval_batch=256",
                      "finetune.epochs=5", "search.top_k=1", "model.train_epochs=2"],
        "baseline_epochs": 2,
    },
    # the same network from the converged baseline committed under bench/baselines/ (30 epochs, `entropy-search
    # train`; its README has the command), every network fine-tuned for 3 epochs: 10% of the baseline's training
    "fashion30": {
        # 10x first, then the latency of uniform pruning at 10x (0.40 measured, batch 1, one thread), then the rest
        "budgets": ["macs:0.1", "latency:0.4", "macs:0.2", "latency:0.5", "latency:0.33"],
        "overrides": ["model.name=resnet20", "data.name=fashion_mnist", "data.eval_batch=256", "finetune.epochs=3"],
        "checkpoint": "bench/baselines/resnet20_fashion_mnist_e30.pt",
        "baseline_epochs": 30,
    },
}
#: The rows a search gives, in table order: its delivered network, the agent's pick, then its baselines.
SEARCH_METHODS = ("delivered", "agent", "random", "uniform", "uniform_shallow", *PEER_RECIPES)
#: The other rows: uniform pruning's prune + fine-tune timed alone (`entropy-search prune`), for the time column;
#: NVIDIA Model Optimizer's FastNAS (bench/fastnas_peer.py, an optional extra).
UNIFORM_CLI = "uniform_cli"
FASTNAS = "fastnas"
#: What `--methods` can run: the searches (every SEARCH_METHODS row), uniform pruning alone, FastNAS.
RUNS = ("search", UNIFORM_CLI, FASTNAS)
#: What each method is, for the tables.
DESCRIPTIONS = {
    "delivered": "delivered by the search (the final stage's pick)",
    "agent": "the agent's pick (its best reward)",
    "random": "random search (as many evaluations)",
    "uniform": "uniform pruning",
    "uniform_shallow": "uniform pruning, one block fewer per stage",
    "tp_magnitude": "Torch-Pruning, global L1",
    "tp_taylor": "Torch-Pruning, global Taylor",
    "tp_isomorphic": "Torch-Pruning, isomorphic L1",
    FASTNAS: "Model Optimizer FastNAS",
}


def parse_budget(text: str) -> tuple[str, float]:
    """`macs:0.1` -> ("macs", 0.1); `latency:0.5` -> ("latency", 0.5)."""
    kind, _, value = text.partition(":")
    if kind not in ("macs", "latency") or not value:
        raise SystemExit(f"a budget is macs:RATIO or latency:RATIO, got {text!r}")
    return kind, float(value)


def budget_overrides(budget: str) -> list[str]:
    kind, value = parse_budget(budget)
    if kind == "macs":
        return ["search.budget=macs", f"search.flops_target={value:g}"]
    return ["search.budget=latency", f"search.latency_target={value:g}"]


def checkpoint_of(args) -> Path:
    """The baseline: --checkpoint, else the preset's committed one, else OUT/baseline.pt (trained by the first run)."""
    preset = PRESETS[args.preset].get("checkpoint")
    return args.checkpoint or (ROOT / preset if preset else args.runs / "baseline.pt")


def timed(cmd: list[str], what: str, *, quiet: bool = True) -> tuple[str, float]:
    """Run a command of the benchmark in its own process from the repository root: its output (when `quiet`) and
    wall seconds; a failure stops the benchmark with the command's last output."""
    print(f"[{time.strftime('%H:%M:%S')}] {what} ...", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=quiet, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{what} failed ({done.returncode}):\n{(done.stdout or '')[-2000:]}{(done.stderr or '')[-2000:]}")
    print(f"    done in {wall:.0f} s", flush=True)
    return done.stdout or "", wall


def run_dir(runs: Path, budget: str, reward: str, seed: int) -> Path:
    return runs / f"{budget.replace(':', '')}-{reward}-s{seed}"


#: Every search of the tables fine-tunes all its finalists in full (`selection.method: full`), so that each
#: baseline and Torch-Pruning recipe has its test figures after the same fine-tune (the shipped default, halving
#: with survivors, fine-tunes only uniform pruning and the last rung's best in full; it delivered what `full`
#: delivered on the same seeds: bench/RESULTS.md, "Time to the delivered network").
TABLE_OVERRIDES = ["selection.method=full"]


def overrides(args, budget: str, reward: str, seed: int) -> list[str]:
    return (PRESETS[args.preset]["overrides"] + TABLE_OVERRIDES + budget_overrides(budget) + args.set
            + [f"search.reward={reward}", f"seed={seed}", f"model.checkpoint={checkpoint_of(args)}",
               f"search.latency_cache={args.runs / 'latency_tables'}"])


def run_search(args, budget: str, reward: str, seed: int) -> tuple[dict, float]:
    """One search in its own process (continued with --resume when its folder holds an interrupted one): its
    result and the wall seconds of this process (None when continued: not the time to the delivered network)."""
    folder = run_dir(args.runs, budget, reward, seed)
    if (folder / "result.json").exists():
        return json.loads((folder / "result.json").read_text()), None
    resume = (folder / "checkpoints").exists()
    cmd = [sys.executable, "-m", "entropy_search.cli", "search", str(ROOT / "examples" / "digits_search.yaml"),
           "--output", str(folder), "--no-progress", "--resume" if resume else "--overwrite"]
    for item in overrides(args, budget, reward, seed):
        cmd += ["--set", item]
    _, wall = timed(cmd, f"search {budget} {reward} seed {seed}{' (resumed)' if resume else ''}", quiet=not args.verbose)
    return json.loads((folder / "result.json").read_text()), None if resume else wall


def networks_of(result: dict) -> dict[str, dict]:
    """The finalised network of each method in a search's result (methods it did not run are left out)."""
    found = {"delivered": delivered_network(result), "agent": agent_pick(result)}
    for name in SEARCH_METHODS[2:]:
        final = (result["baselines"].get(name) or {}).get("final")
        if final:
            found[name] = final
    return found


def baseline_space(result: dict) -> PruningSpace:
    """The pruning space of a search's baseline architecture (its weights do not matter for timing: dense kernels
    take as long on any values)."""
    ckpt = load_checkpoint(result["config"]["model"]["checkpoint"])
    model = create_model(ckpt.model_name, num_classes=ckpt.num_classes, in_channels=ckpt.in_channels,
                         **ckpt.model_kwargs).eval()
    return PruningSpace(model, ckpt.example_input(), round_to=result["config"]["search"]["round_to"])


def measured_latency(space: PruningSpace, networks: dict[str, dict], *, threads: int = 1) -> dict[str, float]:
    """Each network's batch-1 latency as a ratio of the unpruned network's, physically pruned and timed interleaved
    with it on this machine."""
    meter = LatencyMeter(space, device="cpu", batch=1, threads=threads)
    labels = list(networks)
    counts = [[g.channels for g in space.groups]] + [networks[k]["kept_channels"] for k in labels]
    dropped = [()] + [tuple(networks[k].get("dropped_blocks") or ()) for k in labels]
    ms = meter(counts, dropped)
    return {"unpruned_ms": ms[0], **{k: t / ms[0] for k, t in zip(labels, ms[1:])}}


def search_rows(args, budget: str, reward: str, seed: int, result: dict, wall: float | None) -> list[dict]:
    """One row per method of a finished search."""
    networks = networks_of(result)
    space = baseline_space(result)
    latency = measured_latency(space, networks)
    cost = result["cost"]
    blocks = len(space.blocks) or None
    rows = []
    for method, net in networks.items():
        baseline = result["baselines"].get(method) or {}
        row = {"preset": args.preset, "budget": budget, "reward": reward, "seed": seed, "method": method,
               "label": net.get("label", method), "macs_ratio": net.get("macs_ratio"),
               "params_ratio": net.get("params_ratio"), "latency_ratio": latency[method],
               "unpruned_latency_ms": latency["unpruned_ms"], "kept_channels": net.get("kept_channels"),
               "dropped_blocks": net.get("dropped_blocks") or [], "blocks_kept": net.get("blocks_kept"),
               "blocks": blocks, "heldout_in_search": net.get("heldout_accuracy"),
               "test_before": net.get("test_accuracy_before_finetune"),
               "test_after": net.get("test_accuracy_after_finetune"),
               "heldout_after": net.get("heldout_accuracy_after_finetune"),
               "finetune_epochs": net.get("finetune_epochs"), "finetune_seconds": net.get("finetune_seconds"),
               "found_seconds": cost.get("search_seconds") if method in ("delivered", "agent")
               else baseline.get("seconds"),
               "within_tolerance": (baseline.get("best") or {}).get("within_tolerance", True),
               "unpruned_test": result["base"]["test_accuracy"]}
        if method == "delivered":
            row.update(wall_seconds=wall, total_seconds=cost.get("total_seconds"), iterations=cost.get("iterations"),
                       stopped_by=cost.get("stopped_by"), evaluations=cost.get("evaluations"),
                       finetunes_at_once=cost.get("finetunes_at_once"))
        rows.append(row)
    return rows


def uniform_cli_row(args, budget: str, seed: int, uniform: dict) -> dict:
    """Uniform pruning's prune + fine-tune timed alone (`entropy-search prune`, the same network and fine-tune as
    the search's uniform row): what a user who runs no search waits for."""
    kind, value = parse_budget(budget)
    folder = args.runs / f"{budget.replace(':', '')}-uniform-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    how = ["--flops-target", f"{value:g}"] if kind == "macs" else ["--keep", repr(uniform["keep"][0])]
    epochs = uniform["finetune_epochs"]
    cmd = [sys.executable, "-m", "entropy_search.cli", "prune", str(checkpoint_of(args)), *how, "--epochs", str(epochs),
           "--seed", str(seed), "--out", str(folder / "uniform.pt"), "--no-progress"]
    out, wall = timed(cmd, f"uniform pruning alone {budget} seed {seed}")
    found = re.search(r"test top-1 fine-tuned\s+([\d.]+)", out)
    return {"preset": args.preset, "budget": budget, "reward": None, "seed": seed, "method": UNIFORM_CLI,
            "wall_seconds": wall, "test_after": float(found.group(1)) if found else None, "finetune_epochs": epochs}


def _has(rows: list[dict], budget: str, reward: str | None, seed: int, method: str) -> bool:
    return any(r["budget"] == budget and r["seed"] == seed and r["method"] == method
               and (reward is None or r["reward"] == reward) for r in rows)


def _append(path: Path, new: list[dict], rows: list[dict]) -> None:
    """Rows to the file as they finish (one JSON object a line) and to the rows in memory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        for row in new:
            fh.write(json.dumps(row) + "\n")
    rows.extend(new)


def fastnas_row(args, budget: str, seed: int) -> dict:
    """FastNAS at the budget, on the search's problem (its config, data and latency table) with the seed's
    fine-tune (bench/fastnas_peer.py); its sensitivity map is measured once for every budget and seed."""
    from fastnas_peer import fastnas_row as run  # this folder; imports Model Optimizer, an optional extra

    print(f"[{time.strftime('%H:%M:%S')}] FastNAS {budget} seed {seed} ...", flush=True)
    t0 = time.perf_counter()
    config = load_config(None, parse_overrides(overrides(args, budget, args.rewards[0], seed)))
    row = run(setup(config), args.runs / "fastnas" / "sensitivity.pth", seed=seed)
    print(f"    done in {time.perf_counter() - t0:.0f} s", flush=True)
    return {"preset": args.preset, "budget": budget, "reward": None, "seed": seed, **row,
            "unpruned_test": None}


def run_all(args, rows: list[dict]) -> None:
    """Every (budget, seed, reward) not yet in the rows, budget by budget so each fills up its seeds first."""
    why_not = fastnas_unavailable() if FASTNAS in args.methods else None
    if why_not:
        print(f"FastNAS not run: {why_not}", flush=True)
    for budget in args.budgets:
        for seed in args.seeds:
            for reward in args.rewards:
                if "search" in args.methods and not _has(rows, budget, reward, seed, "delivered"):
                    result, wall = run_search(args, budget, reward, seed)
                    _append(args.rows, search_rows(args, budget, reward, seed, result, wall), rows)
            searched = run_dir(args.runs, budget, args.rewards[0], seed) / "result.json"
            if UNIFORM_CLI in args.methods and searched.exists() and not _has(rows, budget, None, seed, UNIFORM_CLI):
                result = json.loads(searched.read_text())
                _append(args.rows, [uniform_cli_row(args, budget, seed, result["baselines"]["uniform"]["final"])], rows)
            if FASTNAS in args.methods and not why_not and not _has(rows, budget, None, seed, FASTNAS):
                _append(args.rows, [fastnas_row(args, budget, seed)], rows)


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * spread:.{digits}f}"


def _mean(values: list[float], fmt: str = ".0f") -> str:
    values = [v for v in values if v is not None]
    return format(statistics.fmean(values), fmt) if values else "-"


def report(rows: list[dict], preset: str) -> str:
    """A markdown table per budget and reward: mean ± std over seeds of each method, its gap to uniform pruning
    per seed, and the wall time to the delivered network next to uniform pruning's alone."""
    lines = []
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    for budget in budgets:
        at = [r for r in rows if r["budget"] == budget]
        alone = {r["seed"]: r for r in at if r["method"] == UNIFORM_CLI}
        for reward in dict.fromkeys(r["reward"] for r in at if r["reward"] is not None):
            runs = [r for r in at if r["reward"] == reward]
            seeds = sorted({r["seed"] for r in runs})
            uniform = {r["seed"]: r["test_after"] for r in runs if r["method"] == "uniform"}
            first = runs[0]
            epochs = first.get("finetune_epochs")
            share = PRESETS.get(preset, {}).get("baseline_epochs")
            kind, value = parse_budget(budget)
            what = f"{1 / value:.1f}x fewer MACs" if kind == "macs" else f"{value:g} of the unpruned batch-1 latency"
            lines.append(f"\n{preset}, {budget} ({what}), reward {reward}, seeds {seeds}; unpruned test accuracy "
                         f"{100 * first['unpruned_test']:.2f}%, unpruned latency {first['unpruned_latency_ms']:.2f} ms "
                         f"(batch 1, one thread); every network fine-tuned {epochs} epochs"
                         + (f" ({100 * epochs / share:.0f}% of the baseline's {share})" if share and epochs else ""))
            lines.append("| method | seeds | MACs ratio | latency ratio (measured) | blocks kept | test acc. before "
                         "fine-tune (%) | **test acc. after (%)** | minus uniform per seed (points) | found in (s) "
                         "| fine-tune (s) |")
            lines.append("|---|---|---|---|---|---|---|---|---|---|")
            peers = [r for r in at if r["method"] == FASTNAS]
            for method in (*SEARCH_METHODS, FASTNAS):
                mine = sorted((r for r in (peers if method == FASTNAS else runs) if r["method"] == method),
                              key=lambda r: r["seed"])
                if not mine:
                    continue
                gaps = ", ".join(f"{100 * (r['test_after'] - uniform[r['seed']]):+.2f}" for r in mine
                                 if r["seed"] in uniform and r["test_after"] is not None)
                blocks = sorted({f"{r['blocks_kept']}/{r['blocks']}" if r.get("blocks_kept") is not None
                                 else "-" if r.get("unreachable") else "all" for r in mine})
                labels = "" if method != "delivered" else f" ({', '.join(r['label'] for r in mine)})"
                outside = "" if all(r["within_tolerance"] for r in mine) else " (outside the budget's 3%)"
                unreachable = [r for r in mine if r.get("unreachable")]
                if unreachable:  # FastNAS's smallest network over a latency budget: no network, the reason
                    seeds_out = ", ".join(str(r["seed"]) for r in unreachable)
                    outside = f" (cannot reach the budget at seed {seeds_out}: {unreachable[0]['unreachable']})"
                    mine = [r for r in mine if not r.get("unreachable")] or unreachable
                lines.append(
                    f"| {DESCRIPTIONS[method]}{labels}{outside} | {len(mine)} | {_mean([r['macs_ratio'] for r in mine], '.3f')} "
                    f"| {_mean([r['latency_ratio'] for r in mine], '.3f')} | {', '.join(blocks)} "
                    f"| {_mean_std([r['test_before'] for r in mine])} | **{_mean_std([r['test_after'] for r in mine])}** "
                    f"| {gaps or '-'} | {_mean([r['found_seconds'] for r in mine])} "
                    f"| {_mean([r['finetune_seconds'] for r in mine])} |")
            times = []
            for r in sorted((r for r in runs if r["method"] == "delivered"), key=lambda r: r["seed"]):
                base = alone.get(r["seed"])
                if r.get("wall_seconds") and base:
                    times.append(f"seed {r['seed']}: {r['wall_seconds']:.0f} s against {base['wall_seconds']:.0f} s "
                                 f"({r['wall_seconds'] / base['wall_seconds']:.1f}x)")
            if times:
                lines.append(f"\nTime to the delivered network (the search's process) against uniform pruning's prune "
                             f"+ fine-tune alone (`entropy-search prune`): {'; '.join(times)}.")
            best = best_of_others(runs + peers)
            if best:
                lines.append("Delivered minus the best of uniform pruning and the peers' recipes (mean over seeds): "
                             + "; ".join(f"{name} {100 * gap:+.2f}" for name, gap in best))
    return "\n".join(lines)


def best_of_others(runs: list[dict]) -> list[tuple[str, float]]:
    """The delivered network's mean test accuracy minus the best mean of uniform pruning and Torch-Pruning's
    recipes (what a user gets without a search), over the seeds every one of them finished: [(that method, gap)].
    A method with a network outside the budget's 3% (FastNAS steered by FLOPs under a latency budget, isomorphic
    pruning's jumps) is not at the same budget and does not count; the table shows it, marked."""
    outside = {r["method"] for r in runs if not r.get("within_tolerance", True)}
    others = tuple(m for m in ("uniform", *PEER_RECIPES, FASTNAS) if m not in outside)
    by = {m: {r["seed"]: r["test_after"] for r in runs if r["method"] == m} for m in ("delivered", *others)}
    seeds = set(by["delivered"])
    for m in others:
        if by[m]:
            seeds &= set(by[m])
    if not seeds:
        return []
    means = {m: statistics.fmean(by[m][s] for s in seeds) for m in others if by[m]}
    if not means:
        return []
    top = max(means, key=means.get)
    return [(top, statistics.fmean(by["delivered"][s] for s in seeds) - means[top])]


def delivered_at(result: dict, significance: float) -> str | None:
    """The finalist the final stage would have delivered at `significance`, from the held-out accuracies and
    paired p-values its rung recorded (held-out only, never test); None for a run that recorded no p-values
    (before the paired test, or `selection.method: halving`)."""
    rungs = (result.get("selection") or {}).get("rungs") or []
    if not rungs or "p_value_vs_uniform" not in rungs[0]:
        return None
    return guarded_winner(rungs[0]["heldout_accuracy"], rungs[0]["p_value_vs_uniform"], reference="uniform",
                          significance=significance)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="fashion30")
    parser.add_argument("--budgets", nargs="+", default=None, help="macs:RATIO or latency:RATIO (default: the preset's)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rewards", nargs="+", default=["agreement"])
    parser.add_argument("--methods", nargs="+", choices=RUNS, default=list(RUNS),
                        help="what to run: the searches, uniform pruning timed alone, FastNAS (default: all)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="baseline checkpoint (default: the preset's, else RUNS/baseline.pt, trained by the first "
                        "search if missing)")
    parser.add_argument("--out", type=Path, default=None, help="where rows.jsonl goes (default: bench/quality/<preset>)")
    parser.add_argument("--runs", type=Path, default=None, help="the searches' folders (default: runs/quality/<preset>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="show each search's output")
    args = parser.parse_args(argv)
    args.budgets = args.budgets or PRESETS[args.preset]["budgets"]
    for budget in args.budgets:
        parse_budget(budget)
    args.rows = ((args.out or ROOT / "bench" / "quality" / args.preset) / "rows.jsonl").resolve()
    args.runs = (args.runs or ROOT / "runs" / "quality" / args.preset).resolve()
    rows = read_jsonl(args.rows) if args.rows.exists() else []
    if not args.report_only:
        torch.set_num_threads(1)  # this process only times networks; the searches run in their own processes
        run_all(args, rows)
    print(report([r for r in rows if r["budget"] in args.budgets], args.preset))
    return 0


if __name__ == "__main__":
    sys.exit(main())
