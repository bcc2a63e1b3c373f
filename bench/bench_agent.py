"""Does the agent learn? Its best reward against random search's under the same reward and the same number of
evaluations, for agent settings (variants) x seeds, search only (no fine-tuning, no final stage, no export).

Each (variant, seed) is one `entropy-search search` in its own process and output folder; a finished run (its
result.json exists) is not run again, so an interrupted study continues where it stopped. The table is printed
from the result files: per variant, the mean best reward of the agent and of random search, the agent's wins,
and the distinct candidates the agent evaluated (a collapsed policy evaluates few).

    python bench/bench_agent.py --checkpoint runs/digits_cnn/baseline.pt --target 0.3
    python bench/bench_agent.py --checkpoint F.pt --target 0.33 --set model.name=resnet20 --set data.name=fashion_mnist
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from entropy_search.summary import agent_pick

ROOT = Path(__file__).resolve().parent.parent

#: agent settings compared; `default` is the schema's
VARIANTS: dict[str, list[str]] = {
    "default": [],
    # the agent's earlier defaults (older tables call lr 1e-3 x 8 epochs x 2 minibatches "lr1e-3", today's
    # default, and these settings "default")
    "lr1e-4": ["agent.lr=0.0001", "agent.num_epochs=4", "agent.num_minibatches=1"],
    "lr3e-3": ["agent.lr=0.003", "agent.num_epochs=8", "agent.num_minibatches=2"],
    "std0.5": ["agent.initial_std=0.5"],
    "std0.5-lr1e-3": ["agent.initial_std=0.5", "agent.lr=0.001", "agent.num_epochs=8", "agent.num_minibatches=2"],
    # off-policy: SAC replays every evaluated candidate, where PPO learns from each iteration's batch once
    "sac": ["agent.algorithm=sac"],
    "sac-warm32": ["agent.algorithm=sac", "agent.learning_starts_episodes=32"],
}
SEARCH_ONLY = ["finetune.epochs=0", "selection.enabled=false", "baselines.finetune=false", "output.latency=false",
               "output.export_onnx=false"]


def random_result(args, seed: int) -> dict | None:
    """The random search of `seed`: run once, by the first variant run with that seed (its draws depend on the
    seed only), and shared by every variant."""
    for path in sorted(args.out.glob(f"*/s{seed}/result.json")):
        found = json.loads(path.read_text()).get("baselines", {}).get("random")
        if found:
            return found
    return None


def run_one(args, variant: str, seed: int) -> None:
    folder = args.out / variant / f"s{seed}"
    if (folder / "result.json").exists():
        return
    # as many random candidates as the agent has episodes (>= its distinct evaluations: never fewer than the
    # agent's), so the random search is the same for every variant and runs once per seed
    random = [f"baselines.random_candidates={args.iterations * args.episodes}"]
    if random_result(args, seed) is not None:
        random = ["baselines.enabled=false"]
    cmd = [sys.executable, "-m", "entropy_search.cli", "search", str(ROOT / "examples" / "digits_search.yaml"),
           "--output", str(folder), "--no-progress", "--overwrite",
           "--set", f"model.checkpoint={args.checkpoint}", "--set", f"search.flops_target={args.target}",
           "--set", f"stop.iterations={args.iterations}",
           "--set", f"seed={seed}", "--set", f"agent.episodes_per_iteration={args.episodes}"]
    reward = [f"search.reward={args.reward}"] if args.reward else []  # else the schema's default
    for item in SEARCH_ONLY + reward + random + VARIANTS[variant] + args.set:
        cmd += ["--set", item]
    t0 = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {variant} seed {seed} ...", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    print(f"    done in {time.perf_counter() - t0:.0f} s", flush=True)


def report(args) -> str:
    lines = [f"target {args.target:g}, reward {args.reward or 'the default (search.reward)'}, {args.iterations} iterations; "
             "best reward found (mean ± std over seeds), agent wins = seeds where the agent's best > random's",
             "| variant | seeds | agent best | random best | agent wins | distinct candidates (agent) |",
             "|---|---|---|---|---|---|"]
    for variant in args.variants:
        paths = sorted((args.out / variant).glob("s*/result.json"))
        results = [json.loads(p.read_text()) for p in paths]
        randoms = [random_result(args, int(p.parent.name[1:])) for p in paths]
        if not results:
            continue
        agent = [agent_pick(r)["reward"] for r in results]
        rand = [r["best"]["reward"] for r in randoms]
        distinct = [r["cost"]["evaluations"] for r in results]

        def stat(values: list[float]) -> str:
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.fmean(values):.4f} ± {spread:.4f}"

        wins = sum(a > b for a, b in zip(agent, rand))
        lines.append(f"| {variant} | {len(results)} | {stat(agent)} | {stat(rand)} | {wins}/{len(results)} "
                     f"| {statistics.fmean(distinct):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="the baseline checkpoint")
    parser.add_argument("--target", type=float, default=0.3)
    parser.add_argument("--reward", default=None, help="default: the config schema's search.reward")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--episodes", type=int, default=16, help="candidates per PPO iteration")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=sorted(VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "agent_study")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    if not args.report_only:
        for seed in args.seeds:
            for variant in args.variants:
                run_one(args, variant, seed)
    print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
