"""What the exactness guard (`search.check_exact`) costs: one search with the shipped defaults in its own process,
and the guard's seconds (result.json's `exactness`) against the search's wall time, its agent phase and one
candidate's evaluation, measured in that one run. Target: under 5% of the search's wall time.

    python bench/bench_guard.py                                   # the offline default: digits CNN at 2x
    python bench/bench_guard.py --set model.name=resnet20 --set data.name=fashion_mnist \\
        --set model.checkpoint=bench/baselines/resnet20_fashion_mnist_e30.pt --set search.flops_target=0.1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "entropy_search.cli", "search", str(ROOT / "examples" / "digits_search.yaml"),
               "--output", tmp, "--no-progress"]
        for item in args.set:
            cmd += ["--set", item]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        result = json.loads((Path(tmp) / "result.json").read_text())
    guard, cost = result["exactness"], result["cost"]
    per_candidate = cost["eval_seconds"] / max(cost["evaluations"], 1)
    print(f"{result['config']['model']['name']} at {result['config']['search']['flops_target']:g}: guard "
          f"{guard['seconds']:.3f} s ({guard['mode']}, relative difference {guard['relative_difference']:.1e}); "
          f"the search's process {wall:.1f} s -> {100 * guard['seconds'] / wall:.2f}% of it; the agent's phase "
          f"{cost['search_seconds']:.1f} s -> {100 * guard['seconds'] / cost['search_seconds']:.1f}%; one candidate's "
          f"evaluation {1000 * per_candidate:.1f} ms -> the guard is {guard['seconds'] / per_candidate:.1f} evaluations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
