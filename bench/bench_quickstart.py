"""Time the quickstart sweep the way a new user runs it, baseline training included.

    python bench/bench_quickstart.py [--warm] [--keep DIR]

Runs the README's first command, `entropy-search sweep tune_configs/quickstart.yaml` (what `make quickstart`
runs), with the installed `entropy-search`, in a fresh folder holding a copy of tune_configs/ (so MLflow's
default store ./mlflow.db and runs/ start empty and no baseline checkpoint exists); prints what the command
printed and its wall time against the 5-minute budget. `--warm` runs it a second time with `--overwrite`, when
the baseline checkpoint exists, to show the cost of the trials alone. `--keep DIR` runs in DIR and keeps it:
tests/test_readme_commands.py runs the README's command block that way, the later commands in the same folder.
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
#: The README's first command line and `make quickstart`'s recipe, without the executable (tests/ check both).
COMMAND = ("sweep", "tune_configs/quickstart.yaml")
EXECUTABLE = Path(sys.executable).parent / "entropy-search"


def run_once(where: Path, *extra: str) -> tuple[float, int, str]:
    """Run COMMAND in `where` (tune_configs/ copied in first); its wall time, exit status and what it printed."""
    shutil.copytree(REPO / "tune_configs", where / "tune_configs", dirs_exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    t0 = time.perf_counter()
    proc = subprocess.run([str(EXECUTABLE), *COMMAND, "--quiet", *extra], cwd=where, env=env, capture_output=True,
                          text=True)
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
