"""`entropy-search ui`: the MLflow UI for the configured store, on 127.0.0.1, until Ctrl-C.

Starts `mlflow server` on the local store (``--tracking-uri``, else MLFLOW_TRACKING_URI, else
./mlflow.db), waits until its /health answers, prints its address and the pages of the latest sweep
(or `--sweep NAME`): its trials side by side (FLOPs ratio and accuracies as columns and charts) and
its parent run (description with the summary table and the FLOPs-versus-accuracy plot); `--open`
opens the first in a browser. It stops the server (its whole process group) on Ctrl-C or SIGTERM.
When the configured store is already a tracking server (http...), the server is the UI: it prints that
address and the sweep's pages on it (one line, exit 2, when the server does not answer). See docs/design.md,
"Tracking".
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import webbrowser
from pathlib import Path

from ..errors import EntropySearchError
from ..store import check_reachable, is_local_store, local_store_dir, resolve_tracking_uri


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "ui",
        help="start the MLflow UI for the configured store on 127.0.0.1 and print its address",
        description="Serve the MLflow UI (mlflow server) for the tracking store the sweeps use: --tracking-uri, "
        "else MLFLOW_TRACKING_URI, else ./mlflow.db. Listens on 127.0.0.1 only unless --host says otherwise; "
        "Ctrl-C stops it.",
    )
    parser.add_argument("--tracking-uri", default=None, help="store to serve (sqlite:///..., a folder, ...)")
    parser.add_argument("--config", default=None, help="take the store from this sweep YAML's mlflow.tracking_uri")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=5000, help="port (0: any free port)")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server to answer")
    parser.add_argument("--sweep", default=None, help="print the pages of this sweep (default: the latest one)")
    parser.add_argument("--open", action="store_true", help="open the sweep's page (else the UI) in a web browser")
    parser.set_defaults(func=run)
    return parser


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    return False


def start_server(uri: str, host: str, port: int, workers: int, timeout: float) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` for the store and wait until it answers; port 0 picks a free one.

    A port picked here can be taken before the server binds it (seconds of imports later): with port 0,
    a server that exits before answering is started again on another free port.
    """
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    for _ in range(3 if port == 0 else 1):
        chosen = port or free_port(host)
        proc = subprocess.Popen(server_command(uri, host, chosen, workers), env=env, start_new_session=True)
        url = f"http://{host}:{chosen}"
        try:
            healthy = wait_healthy(url, timeout, proc)
        except BaseException:  # Ctrl-C or SIGTERM while waiting: no server is left behind
            _stop(proc)
            raise
        if healthy:
            return proc, url
        if proc.poll() is None:
            break
    _stop(proc)
    raise EntropySearchError(f"the MLflow server did not answer at {url} within {timeout:g} s "
                             f"(exit status {proc.poll()}); is port {chosen} free?")


def server_command(uri: str, host: str, port: int, workers: int) -> list[str]:
    """`mlflow server` for a local store, its artifacts served from next to the database."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--workers", str(workers)]
    store = local_store_dir(uri)
    if store is not None:  # runs logged to this store keep their own artifact folders; new ones go here
        cmd += ["--artifacts-destination", str(store / "mlartifacts")]
    return cmd


def run(args: argparse.Namespace) -> int:
    uri = args.tracking_uri
    if uri is None and args.config:
        from ..sweep import load_sweep_config  # deferred: Ray Tune takes seconds to import

        uri = load_sweep_config(args.config).mlflow.tracking_uri
    uri = resolve_tracking_uri(uri)
    if not is_local_store(uri):  # the server is the UI: its address and the sweep's pages on it
        check_reachable(uri)
        pages = sweep_pages(uri, args.sweep)
        print(f"the configured store is a tracking server: open {uri} (it serves the UI)", flush=True)
        _announce(uri.rstrip("/"), pages, open_browser=args.open)
        return 0
    pages: dict[str, str] = {}
    db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    if db is not None and not db.exists():
        if args.sweep:
            raise EntropySearchError(f"no MLflow store at {db} (set --tracking-uri or MLFLOW_TRACKING_URI)")
        print(f"note: {db} does not exist yet; the UI will show an empty store until a sweep logs to it", flush=True)
    else:
        pages = sweep_pages(uri, args.sweep)

    def stop(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    proc = None
    try:
        proc, url = start_server(uri, args.host, args.port, args.workers, args.timeout)
        print(f"MLflow UI: {url}  (store: {uri}; Ctrl-C stops it)", flush=True)
        _announce(url, pages, open_browser=args.open)
        while proc.poll() is None:
            time.sleep(0.5)
        return proc.returncode or 0
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc is not None:
            _stop(proc)


def _announce(url: str, pages: dict[str, str], *, open_browser: bool) -> None:
    """Print the sweep's pages under the UI's root address `url`; with `open_browser`, open the first."""
    for label, page in pages.items():
        print(f"{label}: {url}/{page}", flush=True)
    if open_browser:
        first = f"{url}/{next(iter(pages.values()))}" if pages else url
        if not webbrowser.open(first):
            print(f"note: no web browser could be started here; open {first}", flush=True)


def sweep_pages(uri: str, name: str | None = None) -> dict[str, str]:
    """{label: UI page relative to the root address} of sweep `name` (default: the latest sweep in the
    store); empty when the store holds no sweep. A sweep logged by an older version gets its
    experiment's model-training tag, its runs view and, once it has ended, its parent run's story here."""
    from .. import tracking  # deferred: tracking imports torch, Ray and MLflow (seconds)

    mlclient = tracking.client(uri)
    run = tracking.find_sweep_run(mlclient, name=name)
    if run is None:
        if name is not None:
            raise EntropySearchError(f"no sweep {name!r} in the MLflow store {uri}")
        return {}
    experiment = mlclient.get_experiment(run.info.experiment_id)
    tracking.mark_model_training(mlclient, experiment)
    if tracking.SHARED_VIEW_PREFIX + tracking.sweep_view_key(run.info.run_id) not in experiment.tags:
        tracking.publish_sweep_view(mlclient, experiment.experiment_id, run.info.run_id)
    links = tracking.sweep_links(experiment.experiment_id, run.info.run_id)
    sweep = run.data.tags.get(tracking.SWEEP_TAG, run.info.run_name)
    if run.info.status != "RUNNING" and links["runs"] not in run.data.tags.get(tracking.NOTE_TAG, ""):
        rows = tracking.sweep_rows(mlclient, experiment.experiment_id, run.info.run_id)
        description = run.data.params.get("sweep.description") or f"sweep {sweep}"
        tracking.set_tags(mlclient, run.info.run_id, {tracking.NOTE_TAG: tracking.sweep_description(
            description, rows, experiment.experiment_id, run.info.run_id)})
    return {f"sweep {sweep!r}, its trials (FLOPs vs accuracy)": links["runs"],
            f"sweep {sweep!r}, its parent run (summary table and plot)": links["parent"]}


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and everything it started (its own process group)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)
