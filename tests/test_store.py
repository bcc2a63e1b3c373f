"""Where the MLflow store is (`entropy_search.store`), without MLflow: URIs made absolute so that Tune trials,
which run in other working directories, find the same store."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from entropy_search.errors import ConfigError
from entropy_search.store import (
    DEFAULT_TRACKING_URI,
    check_reachable,
    is_local_store,
    local_store_dir,
    resolve_tracking_uri,
)

REPO = Path(__file__).resolve().parents[1]


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    here = tmp_path.resolve()
    assert DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    assert resolve_tracking_uri() == f"sqlite:///{here}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///x/m.db") == f"sqlite:///{here}/x/m.db"
    assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("postgresql://user@db/mlflow") == "postgresql://user@db/mlflow"
    assert resolve_tracking_uri("store") == str(here / "store")  # a plain folder: MLflow's file store
    assert resolve_tracking_uri("file:runs") == f"file://{here}/runs"
    assert resolve_tracking_uri("file:///abs/runs") == "file:///abs/runs"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://head:5000")
    assert resolve_tracking_uri() == "http://head:5000"
    assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"  # the explicit one wins


def test_local_stores_and_their_folders(tmp_path):
    assert is_local_store("sqlite:////a.db") and is_local_store("file:///tmp/mlruns") and is_local_store("/tmp/mlruns")
    assert not is_local_store("http://head:5000") and not is_local_store("databricks://profile")
    assert local_store_dir(f"sqlite:///{tmp_path}/db/mlflow.db") == tmp_path / "db"
    assert local_store_dir("file:///tmp/mlruns") == Path("/tmp/mlruns")
    assert local_store_dir("/tmp/mlruns") == Path("/tmp/mlruns")
    assert local_store_dir("http://head:5000") is None



def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_tracking_server_fails_fast_in_one_line(tmp_path, capsys, monkeypatch):
    uri = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(ConfigError, match="is not reachable"):
        check_reachable(uri)
    check_reachable(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")  # a local store's folder is created
    assert (tmp_path / "new").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot create"):
        check_reachable(f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}")
    from entropy_search.cli import main

    monkeypatch.chdir(tmp_path)  # not the repository: a quickstart run there leaves a previous sweep behind
    t0 = time.monotonic()
    code = main(["sweep", str(REPO / "tune_configs" / "quickstart.yaml"), "--tracking-uri", uri])
    assert code == 2 and time.monotonic() - t0 < 10  # before Ray starts or a baseline is trained
    err = capsys.readouterr().err.strip()
    assert "not reachable" in err and "\n" not in err and "Traceback" not in err
