"""Faults injected for real: a full disk (a real tmpfs, enlarged afterwards; before and after the first checkpoint,
no row torn), Ctrl-C of the CLI (no Ray process of ours left), SIGKILL of the CLI between two checkpoints (the
resume repeats the uninterrupted search) and before the first one (nothing evaluated missing from the record), SIGKILL
of the CLI alone (the next search stops the Ray processes it left), a
sweep trial whose process is killed (retried from its checkpoint in the same MLflow run), a real MLflow server
down for 30 s mid-sweep (no metric lost).

The tmpfs tests mount one (we may be root); where mounting is not allowed they are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from tiny_runs import candidate_sequence, tiny_search

from entropy_search import cli
from entropy_search.commands import ui
from entropy_search.config import load_config
from entropy_search.errors import EntropySearchError
from entropy_search.jsonio import JsonlAppender, read_jsonl
from entropy_search.problem import record_key
from entropy_search.rl.rundir import CANDIDATES_FILE, CHECKPOINT_DIR, STATE_FILE, is_no_space
from entropy_search.summary import read_candidate_table

ray = pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")

from entropy_search import tracking  # noqa: E402
from entropy_search.search import run_search  # noqa: E402
from entropy_search.sweep import load_sweep_config, run_sweep  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, train_digits_checkpoint) -> Path:
    return train_digits_checkpoint(tmp_path_factory.mktemp("baseline") / "digits_cnn.pt", epochs=3)


def search_dict(out: Path, checkpoint: Path, **overrides) -> dict:
    """The tests' tiny search, top-1, 6 iterations, search only (no baselines, no fine-tune)."""
    return tiny_search(out, checkpoint, **{"search.top_k": 1, "stop.iterations": 6, "baselines.enabled": False,
                                           "finetune.epochs": 0, **overrides})


@pytest.fixture
def tmpfs(tmp_path):
    """A 8 MB tmpfs, unmounted afterwards; skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {(done.stderr or done.stdout).strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_too_little_space_is_one_line_before_ray_starts(checkpoint, tmpfs, capsys):
    """8 MB cannot hold the rows of a million candidates: exit 2, one line naming the folder and the MB needed,
    nothing written."""
    out = tmpfs / "run"
    path = tmpfs.parent / "search.yaml"
    path.write_text(yaml.safe_dump(search_dict(out, checkpoint, **{"stop.iterations": None, "stop.patience": None,
                                                                    "stop.candidates": 1_000_000})))
    assert cli.main(["search", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"no space left on {out}: " in err and " MB needed, " in err and " MB free" in err
    assert not (out / CANDIDATES_FILE).exists() and not (out / CHECKPOINT_DIR).exists()


def test_a_sweep_that_cannot_fit_is_one_line_before_ray_starts(checkpoint, store, tmpfs, capsys):
    """The sweep's trials together need more than the 8 MB tmpfs holds (each alone would fit): exit 2, one line
    naming the sweep folder, the MB needed and the trials, before Ray starts and before any trial writes."""
    base = search_dict(tmpfs / "unused", checkpoint, **{"stop.iterations": None, "stop.patience": None,
                                                                 "stop.candidates": 2000})
    base.pop("resources")
    base["output"].pop("dir")
    path = tmpfs.parent / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "full", "base": base, "axes": {"seed": list(range(8))}, "storage_path": str(tmpfs / "sweeps"),
        "mlflow": {"tracking_uri": store}}))
    assert cli.main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"no space left on {tmpfs / 'sweeps' / 'full'}: " in err and "MB needed for 8 trial(s)" in err
    assert not ray.is_initialized() and not (tmpfs / "sweeps").exists()


@pytest.mark.slow
def test_a_full_disk_stops_the_search_in_one_line_and_resume_continues(ray_local, checkpoint, tmpfs):
    """The tmpfs fills after iteration 3 (a file takes all but 24 KB): the checkpoint of iteration 4 does not fit.
    One line, the checkpoint of iteration 2 intact and nothing half-written left; after the tmpfs is enlarged,
    --resume finishes with every candidate once."""
    out = tmpfs / "run"
    config = load_config(search_dict(out, checkpoint))

    def fill_the_disk(metrics):
        if metrics["iteration"] == 3:
            free = shutil.disk_usage(tmpfs).free
            (tmpfs / "filler").write_bytes(b"\0" * max(0, free - 24 * 1024))

    with pytest.raises(EntropySearchError) as err:
        run_search(config, progress=False, on_iteration=fill_the_disk)
    message = str(err.value)
    assert message.startswith(f"no space left on {out}: ") and " MB needed" in message and "\n" not in message
    assert is_no_space(err.value.__cause__)
    state = json.loads((out / CHECKPOINT_DIR / STATE_FILE).read_text())
    assert state["iteration"] == 2 and (out / CHECKPOINT_DIR / state["agent"]).is_dir()
    assert not list((out / CHECKPOINT_DIR).glob("*.tmp")) and not list((out / CHECKPOINT_DIR).glob(".*.tmp"))
    before = read_jsonl(out / CANDIDATES_FILE)

    subprocess.run(["mount", "-o", "remount,size=64m", str(tmpfs)], check=True)
    result = run_search(config, resume=True, progress=False)
    after = read_jsonl(out / CANDIDATES_FILE)
    assert result["cost"]["iterations"] == 6 and len(after) == result["cost"]["candidates"]
    assert len({c["id"] for c in after}) == len(after) and {c["iteration"] for c in after} == set(range(1, 7))
    assert [c for c in after if c["iteration"] <= 2] == [c for c in before if c["iteration"] <= 2]


def whole_rows(path: Path) -> list[dict]:
    """The rows of a JSON-lines file, asserting that none is torn (every line parses, the file ends a line)."""
    text = path.read_text()
    assert not text or text.endswith("\n"), f"{path.name} ends in a torn row: {text[-80:]!r}"
    return [json.loads(line) for line in text.splitlines()]


def evaluated_keys(rows: list[dict]) -> set[tuple]:
    return {record_key(r) for r in rows if not r.get("cache_hit")}


def test_rows_that_do_not_fit_are_cut_back_whole(tmpfs):
    """A batch of rows written to a full tmpfs raises ENOSPC and leaves the file as it was before the batch (under
    a second)."""
    path = tmpfs / "rows.jsonl"
    rows = JsonlAppender(path)
    rows.write([{"id": 0, "pad": "x" * 100}])
    (tmpfs / "filler").write_bytes(b"\0" * max(0, shutil.disk_usage(tmpfs).free - 4096))
    with pytest.raises(OSError) as err:
        rows.write([{"id": i, "pad": "x" * 1000} for i in range(1, 50)])
    assert is_no_space(err.value)
    assert whole_rows(path) == [{"id": 0, "pad": "x" * 100}]
    (tmpfs / "filler").unlink()
    rows.write([{"id": 1}])
    rows.close()
    assert [r["id"] for r in whole_rows(path)] == [0, 1]


@pytest.mark.slow
def test_a_full_disk_before_the_first_checkpoint_says_so_and_resume_keeps_what_was_evaluated(ray_local, checkpoint,
                                                                                            tmpfs):
    """The tmpfs fills after iteration 1 of 6, with the first checkpoint due at iteration 5: one line saying that
    no checkpoint exists yet, candidates.jsonl without a torn row; after the tmpfs is enlarged, --resume (a fresh
    agent) ends with every candidate evaluated before the fault in the record, each row once. About 40 s."""
    out = tmpfs / "run"
    config = load_config(search_dict(out, checkpoint, **{"output.checkpoint_every": 5}))

    def fill_the_disk(metrics):
        if metrics["iteration"] == 1:
            (tmpfs / "filler").write_bytes(b"\0" * max(0, shutil.disk_usage(tmpfs).free - 2048))

    with pytest.raises(EntropySearchError) as err:
        run_search(config, progress=False, on_iteration=fill_the_disk)
    message = str(err.value)
    assert message.startswith(f"no space left on {out}: ") and "\n" not in message
    assert "(no checkpoint yet: --resume starts the agent afresh and keeps the candidates evaluated)" in message
    assert not (out / CHECKPOINT_DIR / STATE_FILE).exists()
    before = whole_rows(out / CANDIDATES_FILE)
    assert before and {r["iteration"] for r in before} == {1}

    subprocess.run(["mount", "-o", "remount,size=64m", str(tmpfs)], check=True)
    result = run_search(config, resume=True, progress=False)
    after = whole_rows(out / CANDIDATES_FILE)
    assert evaluated_keys(before) <= evaluated_keys(after)
    assert len(after) == result["cost"]["candidates"] and len({r["id"] for r in after}) == len(after)
    assert sum(not r.get("cache_hit") for r in after) == result["cost"]["evaluations"]
    assert all(r["iteration"] == 1 for r in after if r.get("unreplayed"))


def start_search(tmp_path: Path, out: Path, checkpoint: Path,
                 **overrides) -> tuple[subprocess.Popen, list[str], dict[str, str]]:
    """`entropy-search search` of the tests' tiny search into `out` (no patience, a local Ray of 2 CPUs of its own),
    started in a session of its own with its output discarded; the process, and its command and environment for
    a `--resume` after it."""
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(search_dict(out, checkpoint, **{"stop.patience": None, "resources.num_cpus": 2,
                                                                    **overrides})))
    command = [sys.executable, "-m", "entropy_search.cli", "search", str(path), "--no-progress"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=env)
    return proc, command, env


def _ray_processes_of(pid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.Process(pid).children(recursive=True):
        try:
            if proc.name().startswith("ray::") or proc.name() in ("raylet", "gcs_server") or "/ray/" in " ".join(
                    proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _alive(processes: list[psutil.Process]) -> list[str]:
    out = []
    for proc in processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{proc.pid} {proc.name()}")
        except psutil.NoSuchProcess:
            continue
    return out


@pytest.mark.slow
def test_ctrl_c_leaves_no_ray_process_behind(checkpoint, tmp_path):
    """`entropy-search search` in its own process group, Ctrl-C (SIGINT to the group) mid-search: exit 130, and
    3 s later none of the Ray processes it started (raylet, GCS, dashboard and runtime-env agents, env runners)
    is alive."""
    out = tmp_path / "run"
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(search_dict(out, checkpoint, **{"stop.iterations": 200, "stop.patience": None,
                                                                    "output.checkpoint_every": 1,
                                                                    "resources.num_cpus": 2})))
    # as a terminal's foreground job: SIGINT not ignored (a shell's background job, e.g. a CI runner's, starts with
    # SIGINT ignored, Python then installs no KeyboardInterrupt handler, and the signal would never arrive)
    proc = subprocess.Popen([sys.executable, "-m", "entropy_search.cli", "search", str(path), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "RAY_ADDRESS": ""},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while proc.poll() is None and not (out / CHECKPOINT_DIR / STATE_FILE).exists():  # progress: (pytest-timeout)
            time.sleep(0.5)
        ours = _ray_processes_of(proc.pid)
        assert proc.poll() is None and any(p.name() == "raylet" for p in ours), "the search never reached a checkpoint"
        assert sum(p.name().startswith("ray::SingleAgentEnvRunner") for p in ours) == 2
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, output[-3000:]
    time.sleep(3)
    assert _alive(ours) == []


@pytest.mark.slow
def test_a_search_started_after_a_sigkill_stops_what_the_killed_one_left_running(checkpoint, tmp_path):
    """SIGKILL of the CLI's process alone (not its group) mid-search: Ray's processes it started (the dashboard and
    runtime-env agents for minutes) outlive it; `--resume` stops them before it starts its own Ray, says so in
    one line, and finishes. About 60 s."""
    out = tmp_path / "run"
    proc, command, env = start_search(tmp_path, out, checkpoint, **{"stop.iterations": 4,
                                                                    "output.checkpoint_every": 1})
    try:
        while proc.poll() is None and not (out / CHECKPOINT_DIR / STATE_FILE).exists():  # progress (pytest-timeout)
            time.sleep(0.2)
        ours = _ray_processes_of(proc.pid)
        assert proc.poll() is None and any(p.name() == "raylet" for p in ours), "the search never reached a checkpoint"
        proc.kill()
        proc.wait()
        time.sleep(3)
        left = _alive(ours)
        assert left, "nothing of the killed search's Ray outlived it"
        done = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        notes = [line for line in done.stderr.splitlines() if "left by a search that was killed" in line]
        assert len(notes) == 1 and re.search(r"stopped [1-9]\d* Ray processes", notes[0]), done.stderr[-3000:]
        assert _alive(ours) == []
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the killed search's group is still there
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_sigkill_of_the_driver_between_checkpoints_then_resume_repeats_the_uninterrupted_search(checkpoint, tmp_path):
    """`entropy-search search` (no remote env runners: deterministic) gets SIGKILL after an iteration whose rows are
    written but not checkpointed; `--resume` then ends with each candidate once and the same candidates, in the
    same order, and the same best as the same search run without interruption."""
    every = 3
    overrides = {"stop.iterations": 9, "output.checkpoint_every": every, "resources.num_env_runners": 0}

    def command(out: Path, *extra: str) -> list[str]:
        path = out.parent / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(search_dict(out, checkpoint, **overrides)))
        return [sys.executable, "-m", "entropy_search.cli", "search", str(path), "--no-progress", *extra]

    env = {**os.environ, "RAY_ADDRESS": ""}
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    try:
        while proc.poll() is None:  # waits on the search's progress, however slow the machine (pytest-timeout)
            committed = json.loads((out / CHECKPOINT_DIR / STATE_FILE).read_text())["iteration"] if (
                out / CHECKPOINT_DIR / STATE_FILE).exists() else 0
            written = max((r["iteration"] for r in read_jsonl(out / CANDIDATES_FILE)), default=0)
            if every <= committed < written < committed + every:  # rows past a checkpoint, the next one not due
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the search ended before it could be killed between checkpoints"
    committed = json.loads((out / CHECKPOINT_DIR / STATE_FILE).read_text())["iteration"]
    assert max(r["iteration"] for r in read_jsonl(out / CANDIDATES_FILE)) > committed
    assert not (out / "result.json").exists()

    subprocess.run(command(out, "--resume"), check=True, capture_output=True, env=env)
    subprocess.run(command(tmp_path / "whole"), check=True, capture_output=True, env=env)

    resumed, whole = (json.loads((tmp_path / name / "result.json").read_text()) for name in ("killed", "whole"))
    assert len(candidate_sequence(out)) == resumed["cost"]["candidates"] == whole["cost"]["candidates"]
    assert len({r["id"] for r in read_jsonl(out / CANDIDATES_FILE)}) == resumed["cost"]["candidates"]
    assert candidate_sequence(out) == candidate_sequence(tmp_path / "whole")
    assert resumed["agent"]["kept_channels"] == whole["agent"]["kept_channels"]
    assert resumed["agent"]["reward"] == whole["agent"]["reward"]


@pytest.mark.slow
def test_sigkill_before_the_first_checkpoint_then_resume_keeps_every_candidate_evaluated(checkpoint, tmp_path):
    """`entropy-search search` on 2 env runners gets SIGKILL once rows of two iterations are written and before any
    checkpoint; `--resume` starts the agent afresh, and every candidate evaluated before the kill is in
    candidates.jsonl at the end (rows the replay did not write again marked `unreplayed`), each row once and as
    many as result.json counts. About 60 s."""
    out = tmp_path / "killed"
    proc, command, env = start_search(tmp_path, out, checkpoint, **{"stop.iterations": 6,
                                                                    "output.checkpoint_every": 6})
    try:
        while proc.poll() is None:  # waits on the search's progress, however slow the machine (pytest-timeout)
            if max((r["iteration"] for r in read_jsonl(out / CANDIDATES_FILE)), default=0) >= 2:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the search ended before it could be killed"
    assert not (out / CHECKPOINT_DIR / STATE_FILE).exists()
    before = whole_rows(out / CANDIDATES_FILE)

    done = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting the agent afresh (evaluated candidates are kept)" in done.stderr
    after = whole_rows(out / CANDIDATES_FILE)
    result = json.loads((out / "result.json").read_text())
    assert evaluated_keys(before) <= evaluated_keys(after)
    assert len(after) == result["cost"]["candidates"] and len({r["id"] for r in after}) == len(after)
    assert sum(not r.get("cache_hit") for r in after) == result["cost"]["evaluations"]
    unreplayed = [r for r in after if r.get("unreplayed")]
    assert {r["id"] for r in unreplayed} <= {r["id"] for r in before}


@pytest.mark.slow
def test_a_killed_trial_is_retried_from_its_checkpoint_in_the_same_run(ray_local, checkpoint, store, no_default_store,
                                                                       tmp_path):
    """SIGKILL of a trial's process (Tune's function-trainable actor) after its search's first checkpoint: Tune
    retries it (`max_failures`), the search resumes from its checkpoint (iteration 1 is not logged again), in
    the same MLflow run; one run per trial, none left RUNNING, every candidate once in candidates.csv."""
    base = search_dict(tmp_path / "unused", checkpoint, **{"stop.iterations": 8, "output.checkpoint_every": 1,
                                                           "agent.episodes_per_iteration": 4})
    base.pop("resources")
    base["output"].pop("dir")
    sweep = load_sweep_config({
        "name": "retry", "base": base, "axes": {"seed": [0, 1]}, "max_concurrent_trials": 2, "max_failures": 1,
        "storage_path": str(tmp_path / "sweeps"), "mlflow": {"tracking_uri": store, "log_model": False},
        "resources": {"cpus_per_trial": 0.5, "num_env_runners": 1, "cpus_per_env_runner": 0.5},
    })
    killed: list[tuple[int, str]] = []
    sweep_ended = threading.Event()

    def kill_one_trial() -> None:  # waits on the trials' progress, not a deadline (Tune's set-up can take minutes)
        while not sweep_ended.is_set():
            states = list(Path(sweep.sweep_dir).glob(f"*/search/{CHECKPOINT_DIR}/{STATE_FILE}"))
            trials = [p for p in psutil.Process().children(recursive=True) if p.name().startswith("ray::ImplicitFunc")]
            if states and trials:
                trials[0].kill()
                killed.append((trials[0].pid, states[0].parts[-4]))
                return
            time.sleep(0.5)

    killer = threading.Thread(target=kill_one_trial, daemon=True)
    killer.start()
    try:
        result = run_sweep(sweep, verbose=0)
    finally:
        sweep_ended.set()
        killer.join(timeout=5)
    assert killed, "no trial process was killed"
    assert result["status"] == "FINISHED" and result["failed"] == 0 and result["errors"] == 0
    mlclient = tracking.client(store)
    runs = tracking.trial_runs(mlclient, result["experiment_id"], result["parent_run_id"])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert sorted(r.data.tags.get("entropy_search.restarts", "0") for r in runs) == ["0", "1"]
    for run in runs:
        steps = [m.step for m in mlclient.get_metric_history(run.info.run_id, "iteration")]
        assert sorted(steps) == list(range(1, 9)), steps  # each iteration once: the retry resumed, not restarted
        out = Path(sweep.sweep_dir) / run.data.tags[tracking.TRIAL_NAME_TAG] / "search"
        res = json.loads((out / "result.json").read_text())
        rows = read_candidate_table(mlclient.download_artifacts(run.info.run_id, "candidates.csv", str(tmp_path)))
        assert len(rows) == len({r["id"] for r in rows}) == res["cost"]["candidates"]


@pytest.mark.slow
def test_a_tracking_server_down_for_30_s_mid_sweep_loses_no_metric(ray_local, checkpoint, tmp_path):
    """A real `mlflow server` (sqlite) is killed once the trial has logged its first iteration and started again
    on the same port 30 s later: the sweep finishes, every iteration's metrics are in the run once, the run and
    the parent are FINISHED, and candidates.csv holds every candidate."""
    store = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    (tmp_path / "mlflow").mkdir()
    port = ui.free_port()
    url = f"http://127.0.0.1:{port}"
    servers: list[subprocess.Popen] = []

    def start_server() -> None:  # always on `port`: the trial keeps the address it was given
        proc, started = ui.start_server(store, "127.0.0.1", port, 1, 120)
        servers.append(proc)
        assert started == url

    def stop_server() -> None:
        os.killpg(servers[-1].pid, signal.SIGKILL)
        servers[-1].wait()

    base = search_dict(tmp_path / "unused", checkpoint, **{"stop.iterations": 6, "output.checkpoint_every": 1,
                                                           "agent.episodes_per_iteration": 4})
    base.pop("resources")
    base["output"].pop("dir")
    sweep = load_sweep_config({
        "name": "outage", "base": base, "axes": {"seed": [0]}, "storage_path": str(tmp_path / "sweeps"),
        "mlflow": {"tracking_uri": url, "log_model": False},
        "resources": {"cpus_per_trial": 0.5, "num_env_runners": 1, "cpus_per_env_runner": 0.5},
    })
    outage: list[float] = []
    sweep_ended = threading.Event()

    def take_the_server_down() -> None:  # waits on the trial's progress, not a deadline
        while not sweep_ended.is_set():
            if any(read_jsonl(p) for p in Path(sweep.sweep_dir).glob(f"*/search/{CANDIDATES_FILE}")):
                stop_server()
                t0 = time.monotonic()
                time.sleep(30)
                start_server()
                outage.append(time.monotonic() - t0)
                return
            time.sleep(0.2)

    try:
        start_server()
        downer = threading.Thread(target=take_the_server_down, daemon=True)
        downer.start()
        try:
            result = run_sweep(sweep, verbose=0)
        finally:
            sweep_ended.set()
        downer.join(timeout=180)
        assert outage and outage[0] >= 30, "the server was not taken down mid-sweep"
        assert result["status"] == "FINISHED" and result["failed"] == 0
        mlclient = tracking.client(url)
        runs = tracking.trial_runs(mlclient, result["experiment_id"], result["parent_run_id"])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        out = Path(sweep.sweep_dir) / runs[0].data.tags[tracking.TRIAL_NAME_TAG] / "search"
        res = json.loads((out / "result.json").read_text())
        for key in ("iteration", "best_reward", "reward_mean"):
            steps = sorted(m.step for m in mlclient.get_metric_history(runs[0].info.run_id, key))
            assert steps == list(range(1, 7)), (key, steps)
        rows = read_candidate_table(mlclient.download_artifacts(runs[0].info.run_id, "candidates.csv", str(tmp_path)))
        assert len(rows) == res["cost"]["candidates"]
        assert mlclient.get_run(result["parent_run_id"]).info.status == "FINISHED"
    finally:
        for proc in servers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
