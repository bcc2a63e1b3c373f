"""Benchmarks of the search's orchestration (prints ratios; not a timed test).

1. Candidates per second with 1, 2 and 4 env runners when a candidate evaluation costs a simulated
   100 ms (`search.simulate_eval_seconds`; the sleep frees the cores, so this measures the
   orchestration, not the machine), and the RL overhead: the fraction of the env runners' wall time
   not spent evaluating candidates (sampling, the agent's inference and updates, weight sync,
   candidate collection).
   Targets (issue 3): 2 runners >= 1.6x 1 runner; overhead < 25% at 4 runners.
2. The environment's own overhead per candidate beyond the evaluation (masked/sliced forward and
   reward): full episodes through `PruningEnv` (cache off) against `CandidateEvaluator.evaluate` +
   `compute_reward` on the same candidates, in one process. Target: < 10%.

    .venv/bin/python bench/bench_search.py                      # both parts, digits CNN and ResNet-56
    .venv/bin/python bench/bench_search.py --part env --models resnet20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def bench_runners(model: str, runners: list[int], eval_seconds: float, iterations: int, episodes_per_runner: int,
                  algorithm: str, envs_per_runner: int = 1) -> list[dict]:
    import ray

    from entropy_search.config import load_config
    from entropy_search.rl import RLSearch

    rows = []
    ray.init(address="local", num_cpus=max(max(runners) + 1, 2), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        for r in runners:
            out = Path(tempfile.mkdtemp(prefix=f"bench_{model}_{r}_"))
            config = load_config({
                "model": {"name": model},
                "search": {"simulate_eval_seconds": eval_seconds, "cache": False, "flops_target": 0.5},
                "agent": {"algorithm": algorithm, "episodes_per_iteration": episodes_per_runner * r},
                "resources": {"num_env_runners": r, "num_cpus_per_env_runner": 1,
                              "num_envs_per_env_runner": envs_per_runner},
                "stop": {"iterations": iterations + 1},
                "output": {"dir": str(out), "checkpoint_every": 10_000},
            })
            n_steps = _n_steps(config)
            marks: list[tuple[float, int, float]] = []

            phases: list[tuple[float, float]] = []

            def mark(metrics, marks=marks, phases=phases):
                marks.append((time.perf_counter(), metrics["candidates"], metrics["eval_seconds"]))
                phases.append((metrics["sampling_seconds"], metrics["learner_seconds"]))

            search = RLSearch(config, n_steps, progress=False, on_iteration=mark)
            t_build = time.perf_counter()
            search.build()
            build_s = time.perf_counter() - t_build
            t0 = time.perf_counter()
            search.run()
            search.stop()
            # the first iteration warms up (first weights sync, lazy inits): measure the rest
            (t1, c1, e1), (t2, c2, e2) = marks[0], marks[-1]
            wall = t2 - t1
            cands = c2 - c1
            evals = e2 - e1  # seconds spent in evaluations, summed over runners
            rows.append({
                "model": model, "runners": r, "steps": n_steps, "candidates": cands, "wall_s": wall,
                "candidates_per_s": cands / wall, "ideal_per_s": r / eval_seconds,
                "rl_overhead": 1.0 - evals / (r * wall), "build_s": build_s, "total_s": time.perf_counter() - t0,
                "learner_fraction": len(marks[1:]) * phases[-1][1] / wall,  # learner update (EMA) x iterations / wall
            })
            print(json.dumps(rows[-1]), flush=True)
    finally:
        ray.shutdown()
    return rows


def _n_steps(config) -> int:
    """Steps per episode: one per residual block and channel group."""
    from entropy_search.problem import setup

    space = setup(config).space
    return len(space.blocks) + len(space.groups)


def bench_env(model: str, candidates: int, batch: int, threads: int, device: str = "cpu") -> dict:
    """Env overhead per candidate beyond the evaluation (sliced forward + entropy + accuracy + reward), in one
    process with the real evaluator: full episodes through `PruningEnv` (cache off), the time inside the
    evaluation measured in the same run."""
    import torch

    from entropy_search.config import load_config
    from entropy_search.envs import PruningEnv
    from entropy_search.models import create_model, model_spec
    from entropy_search.problem import (
        Budget,
        CandidateCache,
        CandidateEvaluator,
        Network,
        Problem,
        PruningSpace,
        compute_reward,
    )

    torch.set_num_threads(threads)
    spec = model_spec(model)
    torch.manual_seed(0)
    net = create_model(model).eval()
    example = torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size)
    space = PruningSpace(net, example)
    budget = Budget(space, 0.5, 0.1, 0.9)
    gen = torch.Generator().manual_seed(0)  # random images of the model's input shape (timing only)
    x = torch.randn(batch, spec.in_channels, spec.image_size, spec.image_size, generator=gen)
    y = torch.randint(0, spec.num_classes, (batch,), generator=gen)
    net.to(device)
    evaluator = CandidateEvaluator(space, x, y, entropy_layers="bn_relu")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    inside = {"s": 0.0}
    real_evaluate = evaluator.evaluate

    def timed_evaluate(keep):
        sync()
        t0 = time.perf_counter()
        out = real_evaluate(keep)
        compute_reward("entropy", out)
        sync()
        inside["s"] += time.perf_counter() - t0
        return out

    evaluator.evaluate = timed_evaluate
    cache = CandidateCache(space, evaluator, "entropy", enabled=False)
    problem = Problem(Network(net, example), None, space, budget, evaluator, cache, load_config({}, resolve_paths=False))
    env = PruningEnv(problem=problem)
    rng = np.random.default_rng(0)
    action_sets = [rng.uniform(-1, 1, budget.n) for _ in range(candidates)]

    def run_env() -> float:
        inside["s"] = 0.0
        sync()
        t0 = time.perf_counter()
        for actions in action_sets:
            env.reset()
            for a in actions:
                env.step(np.asarray([a], dtype=np.float32))
        sync()
        return time.perf_counter() - t0

    run_env()  # warm-up
    rows = []
    for _ in range(3):
        total = run_env()
        rows.append((total, inside["s"]))
    total, evaluating = min(rows, key=lambda r: (r[0] - r[1]) / r[1])
    row = {
        "model": model, "device": device, "groups": budget.n, "batch": batch, "candidates": candidates,
        "env_ms_per_candidate": 1e3 * total / candidates, "eval_ms_per_candidate": 1e3 * evaluating / candidates,
        "env_overhead": (total - evaluating) / evaluating,
        "env_overhead_ms_per_candidate": 1e3 * (total - evaluating) / candidates,
    }
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "runners", "env"], default="all")
    parser.add_argument("--models", nargs="+", default=["digits_cnn", "resnet56"])
    parser.add_argument("--runners", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--eval-seconds", type=float, default=0.1)
    parser.add_argument("--iterations", type=int, default=4, help="measured iterations (after one warm-up)")
    parser.add_argument("--episodes-per-runner", type=int, default=8)
    parser.add_argument("--envs-per-runner", type=int, default=8, help="environments per env runner (vectorised)")
    parser.add_argument("--algorithm", default="ppo", choices=["ppo", "sac"])
    parser.add_argument("--env-candidates", type=int, default=30)
    parser.add_argument("--env-batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="device of the env-overhead part (cpu, cuda)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")

    if args.part in ("all", "runners"):
        for model in args.models:
            rows = bench_runners(model, args.runners, args.eval_seconds, args.iterations, args.episodes_per_runner,
                                 args.algorithm, args.envs_per_runner)
            by_r = {row["runners"]: row for row in rows}
            print(f"\n{model} ({rows[0]['groups']} groups), simulated evaluation {1e3 * args.eval_seconds:.0f} ms, "
                  f"{args.algorithm}, {args.episodes_per_runner} episodes per runner per iteration, "
                  f"{args.envs_per_runner} env(s) per runner")
            print(f"{'runners':>8} {'cand/s':>8} {'ideal':>7} {'vs 1':>6} {'RL overhead':>12} {'of it learner':>14}")
            for r, row in sorted(by_r.items()):
                speedup = row["candidates_per_s"] / by_r[1]["candidates_per_s"] if 1 in by_r else float("nan")
                print(f"{r:>8} {row['candidates_per_s']:>8.2f} {row['ideal_per_s']:>7.1f} {speedup:>5.2f}x "
                      f"{100 * row['rl_overhead']:>11.1f}% {100 * row['learner_fraction']:>13.1f}%")
            if 1 in by_r and 2 in by_r:
                ratio = by_r[2]["candidates_per_s"] / by_r[1]["candidates_per_s"]
                print(f"2 vs 1 env runner: {ratio:.2f}x (target >= 1.6x): {'OK' if ratio >= 1.6 else 'MISSED'}")
            if 4 in by_r:
                ov = by_r[4]["rl_overhead"]
                print(f"RL overhead at 4 runners: {100 * ov:.1f}% (target < 25%): {'OK' if ov < 0.25 else 'MISSED'}")
    if args.part in ("all", "env"):
        print()
        for model in args.models:
            row = bench_env(model, args.env_candidates, args.env_batch, args.threads, args.device)
            print(f"{model} ({row['groups']} groups, {args.device}): env {row['env_ms_per_candidate']:.2f} ms/candidate, "
                  f"of which evaluation {row['eval_ms_per_candidate']:.2f} ms: overhead "
                  f"{row['env_overhead_ms_per_candidate']:.2f} ms = {100 * row['env_overhead']:.1f}% (target < 10%): "
                  f"{'OK' if row['env_overhead'] < 0.10 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
