"""A bounded soak under faults (issue 9): a sweep of 4 trials x 2 env runners on digits, tracked on a real MLflow
server, with a fault injected every `--interval` seconds at random: an env runner killed (SIGKILL), a trial's
process killed (SIGKILL), the tracking server stopped for `--down` seconds and started again.

    python bench/soak.py [--minutes 15] [--interval 90] [--down 20] [--seed 0] [--keep DIR]

The trials stop by themselves (`stop.wall_seconds`, a little under `--minutes`); the soak then checks what the
sweep left and reports: faults injected and survived (the sweep went on making progress after it, or finished),
candidates lost or duplicated (per trial and iteration, candidates.jsonl against the search's own count, and the
MLflow candidate table against result.json; goal 0 and 0), metric steps lost or duplicated in MLflow, runs per
trial (goal 1) and runs left RUNNING (goal 0). Prints the report and writes it to `<dir>/soak.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import yaml

from entropy_search import tracking
from entropy_search.commands.ui import free_port, start_server
from entropy_search.jsonio import read_jsonl
from entropy_search.problem import train_baseline
from entropy_search.summary import read_candidate_table

TRIALS = 4
ENV_RUNNERS = 2
FAULTS = ("env_runner", "trial", "tracking_server")


def sweep_config(where: Path, checkpoint: Path, uri: str, search_seconds: float) -> dict:
    return {
        "name": "soak",
        "base": {
            "model": {"checkpoint": str(checkpoint), "train_if_missing": False},
            "data": {"eval_batch": 128},
            "search": {"flops_target": 0.5, "top_k": 1, "device": "cpu"},
            "agent": {"episodes_per_iteration": 8, "num_epochs": 2, "num_minibatches": 2},
            "resources": {"max_env_runner_restarts": 20, "driver_threads": 1},
            "stop": {"iterations": None, "patience": None, "wall_seconds": search_seconds},
            "baselines": {"enabled": False},
            "finetune": {"epochs": 0},
            "output": {"checkpoint_every": 2, "export_onnx": False},
        },
        "axes": {"seed": list(range(TRIALS))},
        "max_concurrent_trials": TRIALS,
        "max_failures": 20,
        "storage_path": str(where / "sweeps"),
        "resources": {"num_cpus": TRIALS, "cpus_per_trial": 0.5, "num_env_runners": ENV_RUNNERS,
                      "cpus_per_env_runner": 0.25},
        "mlflow": {"tracking_uri": uri, "log_model": False},
    }


class Server:
    """`mlflow server` on a local sqlite store, stopped and started again on the same port."""

    def __init__(self, where: Path) -> None:
        self.store = f"sqlite:///{where / 'mlflow' / 'mlflow.db'}"
        (where / "mlflow").mkdir(parents=True, exist_ok=True)
        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """(Again) on the same port, so the sweep's tracking URI stays valid across the outage."""
        self.proc, _ = start_server(self.store, "127.0.0.1", self.port, 1, timeout=120)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def named(root: int, prefix: str) -> list[psutil.Process]:
    """Descendants of process `root` whose name starts with `prefix` (Ray sets `ray::<Actor>...`)."""
    out = []
    try:
        for proc in psutil.Process(root).children(recursive=True):
            try:
                if proc.name().startswith(prefix):
                    out.append(proc)
            except psutil.Error:
                continue
    except psutil.NoSuchProcess:
        pass
    return out


def progress(sweep_dir: Path) -> int:
    """Iterations the trials have written candidates for, summed over trials."""
    total = 0
    for path in sweep_dir.glob("*/search/candidates.jsonl"):
        rows = read_jsonl(path)
        total += max((int(r.get("iteration", 0)) for r in rows), default=0)
    return total


def inject(kind: str, sweep_pid: int, server: Server, down: float, rng: random.Random) -> str:
    if kind == "tracking_server":
        server.stop()
        time.sleep(down)
        server.start()
        return f"tracking server down {down:g} s"
    prefix = "ray::SingleAgentEnvRunner" if kind == "env_runner" else "ray::ImplicitFunc"
    targets = named(sweep_pid, prefix)
    if not targets:
        return "no target"
    target = rng.choice(targets)
    target.kill()
    return f"killed pid {target.pid}"


def check(where: Path, server: Server) -> dict:
    """What the sweep left, against the goals (see the module docstring)."""
    sweep_dir = where / "sweeps" / "soak"
    mlclient = tracking.client(server.url)
    parent = tracking.find_sweep_run(mlclient, name="soak")
    runs = tracking.trial_runs(mlclient, parent.info.experiment_id, parent.info.run_id) if parent else []
    per_trial = Counter(r.data.tags.get(tracking.TRIAL_NAME_TAG) for r in runs)
    trials = {}
    totals = Counter()
    for out in sorted(sweep_dir.glob("*/search")):
        name = out.parent.name
        result_path = out / "result.json"
        row = {"result": result_path.exists()}
        rows = read_jsonl(out / "candidates.jsonl")
        if result_path.exists():
            result = json.loads(result_path.read_text())
            counted = {int(h["iteration"]): int(h["iteration_candidates"]) for h in result["history"]}
            written = Counter(int(r["iteration"]) for r in rows)
            lost = sum(max(0, n - written.get(i, 0)) for i, n in counted.items())
            duplicated = sum(max(0, n - counted.get(i, 0)) for i, n in written.items())
            duplicated += len(rows) - len({r["id"] for r in rows})
            row.update(iterations=result["cost"]["iterations"], candidates=result["cost"]["candidates"],
                       rows=len(rows), lost=lost, duplicated=duplicated,
                       env_runners_lost=result["cost"]["env_runners_lost"],
                       env_runner_restarts=result["cost"]["env_runner_restarts"])
            run = next((r for r in runs if r.data.tags.get(tracking.TRIAL_NAME_TAG) == name), None)
            if run is not None:
                steps = Counter(m.step for m in mlclient.get_metric_history(run.info.run_id, "iteration"))
                expected = set(range(1, result["cost"]["iterations"] + 1))
                row["metric_steps_lost"] = len(expected - set(steps))
                row["metric_steps_duplicated"] = sum(n - 1 for n in steps.values())
                row["restarts"] = int(run.data.tags.get("entropy_search.restarts", "0"))
                try:
                    table = read_candidate_table(mlclient.download_artifacts(run.info.run_id, "candidates.csv",
                                                                             tempfile.mkdtemp(dir=where)))
                    row["mlflow_candidates"] = len(table)
                    row["mlflow_duplicated"] = len(table) - len({r["id"] for r in table})
                except Exception as exc:  # noqa: BLE001 - reported as missing
                    row["mlflow_candidates"] = f"missing ({type(exc).__name__})"
            for key in ("lost", "duplicated", "metric_steps_lost", "metric_steps_duplicated"):
                totals[key] += int(row.get(key, 0) or 0)
        trials[name] = row
    return {
        "parent_status": parent.info.status if parent else None,
        "runs": len(runs), "trials_with_result": sum(t["result"] for t in trials.values()),
        "runs_per_trial_max": max(per_trial.values(), default=0),
        "runs_left_running": sum(r.info.status in ("RUNNING", "SCHEDULED") for r in runs),
        "run_statuses": dict(Counter(r.info.status for r in runs)),
        "candidates_lost": totals["lost"], "candidates_duplicated": totals["duplicated"],
        "metric_steps_lost": totals["metric_steps_lost"], "metric_steps_duplicated": totals["metric_steps_duplicated"],
        "trials": trials,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0, help="how long faults are injected (default 15)")
    parser.add_argument("--interval", type=float, default=90.0, help="seconds between faults (default 90)")
    parser.add_argument("--down", type=float, default=20.0, help="seconds the tracking server stays down")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", default=None, help="work in this folder (default: a temporary one)")
    args = parser.parse_args()
    where = Path(args.keep or tempfile.mkdtemp(prefix="es-soak-")).resolve()
    where.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    checkpoint = where / "digits_cnn.pt"
    if not checkpoint.exists():
        train_baseline(checkpoint, model="digits_cnn", data="digits", epochs=10, device="cpu", threads=1,
                       progress=False)
    server = Server(where)
    server.start()
    seconds = args.minutes * 60
    config = where / "soak.yaml"
    # the searches stop a little before the faults do: the last fault still has a sweep to hit
    config.write_text(yaml.safe_dump(sweep_config(where, checkpoint, server.url, 0.9 * seconds)))
    load = os.getloadavg()
    log = open(where / "sweep.log", "w")
    t0 = time.monotonic()
    sweep = subprocess.Popen([sys.executable, "-m", "entropy_search.cli", "sweep", str(config), "--quiet"],
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, "RAY_ADDRESS": ""})
    faults = []
    try:
        next_fault = t0 + args.interval
        while sweep.poll() is None and time.monotonic() - t0 < seconds:
            time.sleep(1)
            if time.monotonic() >= next_fault:
                kind = rng.choice(FAULTS)
                before = progress(where / "sweeps" / "soak")
                what = inject(kind, sweep.pid, server, args.down, rng)
                faults.append({"t": round(time.monotonic() - t0), "kind": kind, "what": what, "before": before})
                print(f"[{faults[-1]['t']:5d} s] {kind}: {what}", flush=True)
                next_fault = time.monotonic() + args.interval
        # the trials stop by themselves; give the sweep time to close
        code = sweep.wait(timeout=max(600, seconds))
    except subprocess.TimeoutExpired:
        os.killpg(sweep.pid, signal.SIGINT)
        code = sweep.wait(timeout=120)
    finally:
        log.close()
    wall = time.monotonic() - t0
    report = check(where, server)
    finished = code == 0 and report["parent_status"] == "FINISHED" and report["run_statuses"] == {"FINISHED": TRIALS}
    end = progress(where / "sweeps" / "soak")
    # a fault is survived when the sweep made progress after it, or finished with every trial FINISHED
    for fault in faults:
        fault["survived"] = finished or (fault["what"] != "no target" and end > fault["before"])
    report.update(
        minutes=args.minutes, interval=args.interval, wall_seconds=round(wall, 1), exit_status=code,
        faults_injected=sum(f["what"] != "no target" for f in faults),
        faults_survived=sum(bool(f["survived"]) and f["what"] != "no target" for f in faults),
        faults_by_kind=dict(Counter(f["kind"] for f in faults if f["what"] != "no target")),
        faults=faults, load_before=[round(x, 2) for x in load], load_after=[round(x, 2) for x in os.getloadavg()],
        cpus=os.cpu_count(), where=str(where),
    )
    server.stop()
    (where / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("trials", "faults")}, indent=2))
    for name, row in report["trials"].items():
        print(f"  {name}: {row}")
    if not report["faults_injected"]:  # the trials ended before the first fault: nothing was tested
        print("soak: no fault was injected (the trials ended first); raise --minutes or lower --interval")
        return 1
    return 0 if finished and not (report["candidates_lost"] or report["candidates_duplicated"]) else 1


if __name__ == "__main__":
    sys.exit(main())
