"""`entropy-search ui` serves the MLflow UI/API of the configured store on 127.0.0.1; `report` errors.

The test starts the command as a subprocess, waits for the server's /health, asks for the experiments
over MLflow's REST API, and stops it by its process id (the command stops the server it started).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from ports import listening

mlflow = pytest.importorskip("mlflow")


def _get(url: str, data: dict | None = None, timeout: float = 10):
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, resp.read().decode()


def test_ui_serves_the_store_on_localhost_and_stops_by_pid(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from entropy_search import tracking

    mlclient = tracking.client(store)
    exp = tracking.get_or_create_experiment(mlclient, "ui-test", store)
    run = mlclient.create_run(exp, run_name="r")
    mlclient.log_metric(run.info.run_id, "m", 1.5)

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "entropy_search.cli", "ui", "--tracking-uri", store, "--port", "0", "--timeout", "90"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tmp_path, env=env,
    )
    try:
        address = None
        deadline = time.monotonic() + 100
        while time.monotonic() < deadline and address is None:
            line = proc.stdout.readline()
            if not line:
                break
            match = re.search(r"MLflow UI: (http://127\.0\.0\.1:(\d+))", line)
            if match:
                address, port = match.group(1), int(match.group(2))
        assert address is not None, f"no address printed (exit status {proc.poll()})"
        status, body = _get(address + "/health")
        assert status == 200 and body.strip().upper().startswith("OK")
        status, body = _get(address + "/api/2.0/mlflow/experiments/search", {"max_results": 100})
        names = {e["name"] for e in json.loads(body)["experiments"]}
        assert status == 200 and "ui-test" in names
        status, body = _get(address + "/api/2.0/mlflow/runs/get?run_id=" + run.info.run_id)
        assert json.loads(body)["run"]["data"]["metrics"][0]["value"] == 1.5
        # listening on the loopback interface only
        for conn in _listening_sockets(port):
            assert conn.startswith("127.0.0.1"), conn
    finally:
        proc.send_signal(signal.SIGTERM)  # by its process id; it stops the server's process group
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and listening(port):
        time.sleep(0.2)
    assert not listening(port), "the server outlived the command"


def _listening_sockets(port: int) -> list[str]:
    """Local addresses listening on `port` (from /proc/net/tcp*), e.g. ['127.0.0.1:5000']."""
    out = []
    for path, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = open(path).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            addr, hexport = local.split(":")
            if state != "0A" or int(hexport, 16) != port:  # 0A = LISTEN
                continue
            if v6:
                out.append(("::1" if addr.endswith("01000000") and set(addr[:24]) == {"0"} else addr) + f":{port}")
            else:
                ip = ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
                out.append(f"{ip}:{port}")
    return out


def test_ui_with_a_tracking_server_prints_its_address_and_the_sweeps_pages_on_it(tmp_path, capsys):
    """The store is a running `mlflow server` holding a sweep: `ui` starts nothing and prints the server's
    address and the sweep's pages on it, which the server serves; a server that does not answer is one line."""
    from entropy_search import tracking
    from entropy_search.cli import main
    from entropy_search.commands.ui import start_server

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlclient = tracking.client(store)
    exp = tracking.get_or_create_experiment(mlclient, "remote-sweep", store)
    parent, _ = tracking.open_sweep_run(mlclient, exp, name="remote", sweep_dir=str(tmp_path / "remote"), params={},
                                        tags={}, resume=False)
    proc, url = start_server(store, "127.0.0.1", 0, 1, 120)
    try:
        assert main(["ui", "--tracking-uri", url]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == f"the configured store is a tracking server: open {url} (it serves the UI)"
        pages = [line.split(": ", 1)[1] for line in out[1:]]
        assert len(pages) == 2 and all(p.startswith(f"{url}/#/experiments/{exp}") for p in pages)
        assert any(parent in p for p in pages)
        for page in pages:
            assert _get(page.split("#")[0])[0] == 200  # the UI's own page: the rest is the browser's route
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert main(["ui", "--tracking-uri", url]) == 2  # the same address, no server any more
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"tracking server {url} is not reachable" in err


def test_report_of_an_unknown_sweep_is_one_line_status_2(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}

    def report():
        return subprocess.run([sys.executable, "-m", "entropy_search.cli", "report", "nope", "--tracking-uri", store],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)

    proc = report()  # no store at all: nothing is created
    assert proc.returncode == 2 and not (tmp_path / "mlflow.db").exists()
    assert proc.stderr.strip().splitlines() == [
        f"entropy-search report: error: no MLflow store at {tmp_path / 'mlflow.db'} "
        "(set --tracking-uri or MLFLOW_TRACKING_URI)"]
    from entropy_search import tracking

    tracking.get_or_create_experiment(tracking.client(store), "other", store)
    proc = report()  # a store without that sweep
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"entropy-search report: error: no sweep 'nope' in the MLflow store {store} "
        "(set --tracking-uri or MLFLOW_TRACKING_URI)"]
    assert not (tmp_path / "nope-comparison.png").exists()


def test_ui_moves_to_another_port_when_the_chosen_one_is_taken(tmp_path, monkeypatch):
    """With --port 0 the port is chosen before the server starts; if something binds it first, the
    server exits and `ui` starts it again on another free port instead of failing."""
    from entropy_search.commands import ui

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        picks = iter([busy, ui.free_port()])
        monkeypatch.setattr(ui, "free_port", lambda host="127.0.0.1": next(picks))
        proc, url = ui.start_server(store, "127.0.0.1", 0, workers=1, timeout=90)
        try:
            assert url != f"http://127.0.0.1:{busy}"
            status, _ = _get(url + "/health")
            assert status == 200
        finally:
            ui._stop(proc)
    assert proc.poll() is not None
    assert not listening(int(url.rsplit(":", 1)[1]))
