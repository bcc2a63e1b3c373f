"""The README's commands run as a new user runs them: its "Command line" block, line by line and top to bottom, with
the installed `entropy-search`, in a fresh folder holding the clone's examples/ and tune_configs/, offline, on the
CPU, with MLflow's default local store (./mlflow.db). Its first line is `make quickstart`'s sweep, run through
`python bench/bench_quickstart.py --keep FOLDER` (the README's timing command), so that both run; the quickstart's
printed table has the columns of the README's copy of it; docs/how-it-works.md's lines that load the delivered
network run last. Options shown in [brackets] are left out; `ui` is started, asked for /health and the sweep's
experiment, and stopped by its process id. Cost: about 4 min on 2 cores with nothing else running (the quickstart
sweep 90 s, one digits search, a 20-epoch digits training and two fine-tunes; pytest's own RSS 1.3 GB, the commands
are its children); marked slow."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from bench_scripts import load_bench
from ports import listening
from readme import readme_blocks, readme_commands

REPO = Path(__file__).resolve().parent.parent
EXECUTABLE = Path(sys.executable).parent / "entropy-search"


def _ui_answers(argv: list[str], cwd: Path, env: dict) -> str:
    """Start `entropy-search ui`, wait for the address it prints, check /health and the quickstart's experiment
    over MLflow's REST API, stop it by its process id; returns what it printed."""
    if listening(5000):  # its default port, taken on this machine by something else
        argv = [*argv, "--port", "0"]
    proc = subprocess.Popen([str(EXECUTABLE), *argv[1:]], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    printed = []
    try:
        address = None
        while address is None:  # waits on its output, not a deadline; the command's own --timeout bounds it
            line = proc.stdout.readline()
            if not line:
                break
            printed.append(line)
            found = re.search(r"MLflow UI: (http://127\.0\.0\.1:\d+)", line)
            address = found.group(1) if found else None
        assert address, f"ui printed no address (exit status {proc.poll()}):\n{''.join(printed)}"
        with urllib.request.urlopen(address + "/health", timeout=30) as answer:
            assert answer.status == 200
        with urllib.request.urlopen(address + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=quickstart",
                                    timeout=30) as answer:
            assert answer.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)  # the process this test started; it stops the server it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return "".join(printed)


def _header(printed: str) -> list[str]:
    """The column names of the quickstart's table in what a sweep printed (the line that starts with "trial")."""
    return next(line.split() for line in printed.splitlines() if line.startswith("trial "))


@pytest.mark.slow
def test_the_readme_command_line_block_runs_top_to_bottom_in_a_fresh_folder(tmp_path):
    for folder in ("examples", "tune_configs"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    commands = readme_commands()
    assert [words[1] for words in commands] == ["sweep", "report", "ui", "train", "prune", "search", "prune",
                                                "measure"]
    quickstart = load_bench("bench_quickstart")
    assert tuple(commands[0][1:]) == quickstart.COMMAND, (commands[0], quickstart.COMMAND)
    printed = {}
    started = time.monotonic()
    for words in commands:
        what = " ".join(words)
        if words == commands[0]:  # the README's timing command runs it, in this folder
            done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_quickstart.py"), "--keep",
                                   str(tmp_path)], env=env, capture_output=True, text=True, timeout=1200)
            assert done.returncode == 0, f"bench_quickstart.py: exit status {done.returncode}\n{done.stdout[-3000:]}"
            printed[what] = done.stdout
            continue
        if words[1] == "ui":
            printed[what] = _ui_answers(words, tmp_path, env)
            continue
        done = subprocess.run([str(EXECUTABLE), *words[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=1200)
        assert done.returncode == 0, f"{what}: exit status {done.returncode}\n{done.stderr[-3000:]}"
        printed[what] = done.stdout
    out = list(printed.values())
    # the quickstart: every trial finished, a row each, the sweep in ./mlflow.db
    assert "sweep quickstart: 6 trial(s), 0 failed" in out[0], out[0][-3000:]
    rows = [line for line in out[0].splitlines() if line.startswith("t0000")]
    assert len(rows) == 6 and all("FINISHED" in row for row in rows), rows
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "runs" / "sweeps" / "quickstart").is_dir()
    assert _header(out[0]) == _header(readme_blocks("The quickstart")[""]), "the README's quickstart table is stale"
    assert sum(line.startswith("t0000") for line in out[1].splitlines()) == 6, out[1]
    assert (tmp_path / "runs" / "digits_cnn" / "baseline.pt").is_file()
    assert "test top-1 fine-tuned" in out[4], out[4]
    assert (tmp_path / "runs" / "digits_search" / "best_pruned.pt").is_file()
    assert "no checkpoint at" not in out[5]  # the search read the baseline `train` wrote
    assert "test top-1 fine-tuned" in out[6], out[6]
    assert "speed-up" in out[7], out[7]
    # docs/how-it-works.md's lines that rebuild and run the delivered network, in the same folder
    rebuild = readme_blocks("Configuration", page=REPO / "docs" / "how-it-works.md")["python"]
    assert "runs/digits_search/best_pruned.pt" in rebuild, rebuild
    subprocess.run([sys.executable, "-c", rebuild], cwd=tmp_path, env=env, check=True, timeout=300)
    print(f"README command line block: {time.monotonic() - started:.0f} s")
