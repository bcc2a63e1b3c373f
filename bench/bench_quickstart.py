"""Time the quickstart sweep the way a new user runs it, baseline training included.

    python bench/bench_quickstart.py [--warm] [--keep DIR]

Runs `entropy-search sweep tune_configs/quickstart.yaml` in a fresh folder (so MLflow's default store
./mlflow.db and runs/ start empty and no baseline checkpoint exists), prints what the command printed
and its wall time against the 5-minute budget. `--warm` runs it a second time with `--overwrite`,
when the baseline checkpoint exists, to show the cost of the trials alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 300.0


def run_once(where: Path, *extra: str) -> tuple[float, int, str]:
    cmd = [sys.executable, "-m", "entropy_search.cli", "sweep", str(REPO / "tune_configs" / "quickstart.yaml"),
           "--quiet", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, proc.returncode, proc.stdout + (proc.stderr if proc.returncode else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm", action="store_true", help="also time a second run with the baseline present")
    parser.add_argument("--keep", default=None, help="run in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    where = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="es-quickstart-"))
    where.mkdir(parents=True, exist_ok=True)
    try:
        seconds, code, out = run_once(where)
        print(out)
        print(f"quickstart (cold: baseline training included): {seconds:.1f} s wall on {os.cpu_count()} CPUs, "
              f"exit status {code}; budget {BUDGET_S:.0f} s -> {'OK' if seconds <= BUDGET_S and code == 0 else 'OVER'}")
        if args.warm and code == 0:
            seconds2, code2, out2 = run_once(where, "--overwrite")
            print(f"quickstart (warm: baseline present): {seconds2:.1f} s wall, exit status {code2}")
        return code
    finally:
        if not args.keep:
            shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
