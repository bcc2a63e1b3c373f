"""The README's first command, `make quickstart` (`entropy-search sweep tune_configs/quickstart.yaml`), run as a new
user runs it: the installed command, in a fresh folder, offline, on the CPU, with MLflow's default local store.
Every trial finishes, the printed table has a row per trial, and the sweep is in ./mlflow.db. Cost: the whole
sweep with its baseline training, 90 s on 2 cores with nothing else running (pytest's own RSS 1.3 GB; the sweep's
processes are its children); marked slow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_quickstart_runs_in_a_fresh_folder(tmp_path):
    command = [str(Path(sys.executable).parent / "entropy-search"), "sweep", str(REPO / "tune_configs" / "quickstart.yaml")]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sweep quickstart: 6 trial(s), 0 failed" in done.stdout, done.stdout[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("t0000")]
    assert len(rows) == 6 and all("FINISHED" in row for row in rows), rows
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "runs" / "sweeps" / "quickstart").is_dir()
