"""Latency as a budget (issue 12; docs/design.md, "Latency budget"): how well the per-group latency table predicts
the measured latency of pruned networks, and a search under a latency budget next to one under a MAC budget of
the same speed. Ratios measured in one run; CPU latency on a machine shared with other processes is noisy, so
every number is a median, torch runs on one thread, and the load average is printed with the results.

    python bench/bench_latency.py predict --model digits_cnn --input 1 8 8 --batch 32 --target 0.5 --random 12
    python bench/bench_latency.py predict --model resnet20 --input 1 28 28 --batch 1 --target 0.5 --random 12
    python bench/bench_latency.py search --checkpoint runs_q/digits/baseline.pt --target 0.5 --iterations 3 --round-to 8

`predict`: an untrained registry network (latency does not depend on the weights) with the input of the data
set; the table built by the search's own `build_budget` (cached in `--cache`, fresh by default); the uniform
candidate and `--random` random candidates drawn with the budget's clipping (what the search evaluates) are
pruned and timed together with the unpruned network (`LatencyMeter`: interleaved rounds), and the predicted
milliseconds are compared with the measured ones, and the predicted latency ratio (to the unpruned network's,
both from the table) with the measured one (both measured together: free of the load's drift, exposed to the
unpruned network's own noise). Also the error of reading the MAC ratio as the latency ratio.
`search`: two searches of the checkpoint's network (the digits CNN in bench/RESULTS.md): `search.budget: latency` at `--target`, then `search.budget: macs` at
the MAC ratio of the uniform network the latency search found (the same speed by the table); each delivered
network is timed with the unpruned one (result.json's latency.budget for the first; `LatencyMeter` for both).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from entropy_search.config import load_config  # noqa: E402
from entropy_search.models import create_model  # noqa: E402
from entropy_search.problem import LatencyMeter, PruningSpace, load_checkpoint  # noqa: E402
from entropy_search.problem.baselines import random_counts, uniform_counts  # noqa: E402
from entropy_search.problem.setup import build_budget  # noqa: E402


def load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def predict(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    c, h, w = args.input
    model = create_model(args.model, num_classes=10, in_channels=c).eval()
    space = PruningSpace(model, torch.zeros(1, c, h, w), round_to=args.round_to)
    cache = args.cache or tempfile.mkdtemp(prefix="latency_tables-")
    config = load_config({"model": {"name": args.model, "checkpoint": str(Path(cache) / "none.pt")},
                          "search": {"budget": "latency", "latency_target": args.target, "latency_batch": args.batch,
                                     "latency_cache": cache, "min_keep": args.min_keep, "round_to": args.round_to,
                                     "flops_floor": args.floor, "latency_statistic": args.statistic}})
    print(f"load average before: {load()}", flush=True)
    t0 = time.perf_counter()
    budget = build_budget(space, config)
    table = budget.cost
    build_s = time.perf_counter() - t0
    print(f"{table.describe()}; {table.measured} networks timed in {build_s:.1f} s; {table.path}", flush=True)
    rng = np.random.default_rng(args.seed)
    _, uniform = uniform_counts(budget)
    candidates = [uniform] + [random_counts(budget, rng) for _ in range(args.random)]
    full = [g.channels for g in space.groups]
    meter = LatencyMeter(space, device="cpu", batch=args.batch, threads=1, rounds=args.rounds, statistic=args.statistic)
    measured = meter([full] + candidates)
    full_ms, measured = measured[0], measured[1:]
    rows = []
    for i, (counts, ms) in enumerate(zip(candidates, measured)):
        predicted = table(counts) / table.base
        actual = ms / full_ms
        macs = budget.macs_ratio(counts)
        rows.append({"label": "uniform" if i == 0 else f"random{i}", "counts": counts, "macs_ratio": macs,
                     "predicted_ms": table(counts), "measured_ms": ms, "ms_error": table(counts) / ms - 1,
                     "predicted_ratio": predicted, "measured_ratio": actual,
                     "error": predicted / actual - 1, "macs_as_latency_error": macs / actual - 1})
        print(f"  {rows[-1]['label']:9} MACs {macs:.3f}  ms predicted {table(counts):.3f} measured {ms:.3f} error "
              f"{100 * rows[-1]['ms_error']:+.1f}%;  ratio to unpruned predicted {predicted:.3f} measured {actual:.3f} "
              f"error {100 * rows[-1]['error']:+.1f}%  (MAC ratio as latency ratio: "
              f"{100 * rows[-1]['macs_as_latency_error']:+.1f}%)", flush=True)
    ms_errors = [abs(r["ms_error"]) for r in rows]
    errors = [abs(r["error"]) for r in rows]
    mac_errors = [abs(r["macs_as_latency_error"]) for r in rows]
    summary = {"model": args.model, "input": args.input, "batch": args.batch, "target": args.target,
               "statistic": args.statistic,
               "unpruned_ms_table": table.base, "unpruned_ms_now": full_ms, "table_networks": table.measured,
               "table_seconds": build_s, "median_abs_error": statistics.median(errors), "max_abs_error": max(errors),
               "within_10pct": sum(e <= 0.10 for e in errors), "candidates": len(rows),
               "median_abs_ms_error": statistics.median(ms_errors), "max_abs_ms_error": max(ms_errors),
               "ms_within_10pct": sum(e <= 0.10 for e in ms_errors),
               "uniform_error": rows[0]["error"], "median_abs_error_macs_as_latency": statistics.median(mac_errors),
               "load_after": load(), "rows": rows}
    print(f"{args.model} batch {args.batch}, target {args.target}, {args.statistic}: predicted ms |error| median "
          f"{100 * summary['median_abs_ms_error']:.1f}%, max {100 * summary['max_abs_ms_error']:.1f}%, within 10%: "
          f"{summary['ms_within_10pct']}/{len(rows)} (unpruned: {table.base:.3f} ms with the table, {full_ms:.3f} ms now); "
          f"predicted ratio |error| median {100 * summary['median_abs_error']:.1f}%, "
          f"max {100 * summary['max_abs_error']:.1f}%, within 10%: {summary['within_10pct']}/{len(rows)}; "
          f"MAC ratio read as latency ratio: |error| median {100 * summary['median_abs_error_macs_as_latency']:.1f}%; "
          f"load average after: {summary['load_after']}", flush=True)
    return summary


def run_one(config: dict, out: Path) -> dict:
    from entropy_search.search import run_search  # deferred: Ray and RLlib take seconds to import

    return run_search(load_config(config, {"output.dir": str(out)}), overwrite=True, progress=False)


def search(args) -> dict:
    torch.set_num_threads(1)
    out = Path(args.out)
    ckpt = load_checkpoint(args.checkpoint)
    common = {
        "model": {"name": ckpt.model_name, "checkpoint": str(Path(args.checkpoint).resolve())},
        "data": {"name": ckpt.data, "eval_batch": args.eval_batch},
        "search": {"round_to": args.round_to, "top_k": 1, "latency_batch": args.batch, "latency_statistic": args.statistic} | ({"latency_cache": args.cache} if args.cache else {}),
        "stop": {"iterations": args.iterations},
        "finetune": {"epochs": args.finetune_epochs},
        "resources": {"num_env_runners": 1, "driver_threads": 1},
        "output": {"latency_batch_sizes": sorted({1, args.batch})},
        "seed": args.seed,
    }
    print(f"load average before: {load()}", flush=True)
    lat_cfg = json.loads(json.dumps(common))
    lat_cfg["search"].update(budget="latency", latency_target=args.target)
    t0 = time.perf_counter()
    lat = run_one(lat_cfg, out / "latency")
    lat_s = time.perf_counter() - t0
    uniform_macs = lat["baselines"]["uniform"]["best"]["macs_ratio"]
    mac_cfg = json.loads(json.dumps(common))
    mac_cfg["search"].update(budget="macs", flops_target=round(uniform_macs, 4))
    t0 = time.perf_counter()
    mac = run_one(mac_cfg, out / "macs")
    mac_s = time.perf_counter() - t0
    space = PruningSpace(create_model(ckpt.model_name, num_classes=ckpt.num_classes, in_channels=ckpt.in_channels).eval(),
                         ckpt.example_input(), round_to=args.round_to)
    meter = LatencyMeter(space, device="cpu", batch=args.batch, threads=1, rounds=args.rounds, statistic=args.statistic)
    full = [g.channels for g in space.groups]
    delivered = {name: r["delivered"]["kept_channels"] for name, r in (("latency", lat), ("macs", mac))}
    times = meter([full] + list(delivered.values()))
    rows = {}
    for (name, counts), ms, result, secs in zip(delivered.items(), times[1:], (lat, mac), (lat_s, mac_s)):
        d = result["delivered"]
        rows[name] = {"delivered": d["label"], "counts": counts, "macs_ratio": d["macs_ratio"],
                      "measured_ratio": ms / times[0], "measured_ms": ms,
                      "test_accuracy_after_finetune": d["test_accuracy_after_finetune"], "seconds": secs,
                      "budget_check": (result.get("latency") or {}).get("budget")}
        print(f"  {name:8} budget: delivered {d['label']:8} {counts} MACs {d['macs_ratio']:.3f}, latency "
              f"{ms / times[0]:.3f} of the unpruned ({ms:.3f} / {times[0]:.3f} ms), test after fine-tuning "
              f"{100 * d['test_accuracy_after_finetune']:.2f}%, {secs:.0f} s", flush=True)
    check = rows["latency"]["budget_check"]
    print(f"latency budget {args.target}: result.json's check (search process): predicted "
          f"{check['predicted_ms'] / check['table_unpruned_ms']:.3f}, measured {check['measured_ratio']:.3f}; here: "
          f"measured {rows['latency']['measured_ratio']:.3f} ({100 * (rows['latency']['measured_ratio'] / args.target - 1):+.1f}% "
          f"vs the target); MAC budget {uniform_macs:.4f}: measured {rows['macs']['measured_ratio']:.3f}; "
          f"load average after: {load()}", flush=True)
    return {"target": args.target, "flops_target": uniform_macs, "unpruned_ms": times[0], "rows": rows, "load_after": load()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("predict")
    p.add_argument("--model", default="digits_cnn")
    p.add_argument("--input", type=int, nargs=3, default=[1, 8, 8])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--random", type=int, default=12)
    p.add_argument("--min-keep", type=float, default=0.1)
    p.add_argument("--round-to", type=int, default=1)
    p.add_argument("--floor", type=float, default=0.97)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--statistic", default="median", choices=["median", "min"])
    p.add_argument("--cache", default=None, help="latency table cache (default: a fresh temporary folder)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    s = sub.add_parser("search")
    s.add_argument("--checkpoint", required=True, help="a trained baseline (its model and data set are searched)")
    s.add_argument("--eval-batch", type=int, default=512, help="held-out images per candidate")
    s.add_argument("--target", type=float, default=0.5)
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--iterations", type=int, default=3)
    s.add_argument("--finetune-epochs", type=int, default=2)
    s.add_argument("--rounds", type=int, default=5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--statistic", default="median", choices=["median", "min"])
    s.add_argument("--round-to", type=int, default=8)
    s.add_argument("--cache", default=None)
    s.add_argument("--out", default=tempfile.mkdtemp(prefix="bench_latency-"))
    s.add_argument("--json", default=None)
    args = parser.parse_args()
    result = predict(args) if args.what == "predict" else search(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
