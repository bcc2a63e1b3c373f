"""Where the MLflow store is, from a URI (no MLflow import): resolved absolute so that Tune trials, which
run in other working directories, find the same store (docs/design.md, "Tracking").

The tracking URI is, in this order: the explicit one (sweep config, ``--tracking-uri``),
``MLFLOW_TRACKING_URI``, MLflow's default ``sqlite:///mlflow.db`` in the current directory.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from .errors import ConfigError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use, absolute for local stores (see the module docstring)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if not path.startswith("/"):
            path = str(Path(path).expanduser().resolve())
        return "sqlite:///" + path
    if uri.startswith("file:"):
        path = uri[len("file:"):].lstrip("/")
        return "file:///" + path if uri.startswith("file:///") else "file://" + str(Path(path).resolve())
    if "://" not in uri and not re.match(r"^[a-z][a-z0-9+.-]*:", uri):
        return str(Path(uri).expanduser().resolve())  # a plain folder: MLflow's file store
    return uri


def is_local_store(uri: str) -> bool:
    """True for stores on this machine's disk (sqlite, file), False for servers and databases."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def local_store_dir(uri: str) -> Path | None:
    """The folder of a local store (the sqlite file's folder, or the file store itself)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" not in uri and not uri.startswith("sqlite:"):
        return Path(uri)
    return None


def check_reachable(uri: str, *, timeout: float = 5.0) -> None:
    """Fail fast (ConfigError, one line) when the store cannot be used: a tracking server that does not answer
    its health check, or a local store whose folder cannot be created. Before Ray starts, so that a wrong
    address costs seconds, not minutes of retries inside the trials."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                if response.status >= 400:
                    raise ConfigError(f"tracking server {uri} answered its health check with HTTP {response.status}")
        except urllib.error.HTTPError as exc:
            raise ConfigError(f"tracking server {uri} answered its health check with HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ConfigError(f"tracking server {uri} is not reachable ({reason}); start it, or set "
                              "mlflow.tracking_uri (--tracking-uri, MLFLOW_TRACKING_URI) to a reachable server or a "
                              "local store") from None
        return
    folder = local_store_dir(uri)
    if folder is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"tracking store {uri}: cannot create {folder} ({exc.strerror or exc})") from None
