"""Run an entropy-search sweep on the Ray cluster this script runs on.

    ray submit cluster/config.yaml cluster/submit_sweep.py -- tune_configs/<name>.yaml [sweep options]

The arguments after `--` are those of `entropy-search sweep` (e.g. `--set base.stop.iterations=5`,
`--name`, `--overwrite`, `--resume`).

`ray submit` copies this file to ~/submit_sweep.py on the head node and runs `python ~/submit_sweep.py
<args>` there in a login shell, where the cluster config has put the project's environment on PATH
and exported MLFLOW_TRACKING_URI (the head's tracking server). This script then

- joins the running cluster: RAY_ADDRESS=auto unless already set, so the sweep's `ray.init()` connects
  to it instead of starting a local Ray;
- points MLflow at the head's tracking server (MLFLOW_TRACKING_URI, default http://127.0.0.1:5000)
  and stops at once, with a clear message, if nothing answers there;
- finds config files given relative to the checkout that `ray up` synced to ~/entropy-search (the
  remote working directory is the home directory, not the checkout);
- exports the checkout's git commit as ENTROPY_SEARCH_GIT_COMMIT (for run tags);
- runs `entropy-search sweep <args>` (in this process: it is the Ray driver) and exits with its status.

It also works as a Ray Jobs entrypoint, from the repository root:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python cluster/submit_sweep.py tune_configs/<name>.yaml

Only the standard library is imported before the sweep starts.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_TRACKING_URI = "http://127.0.0.1:5000"
# Where the cluster configs' file_mounts put the checkout on every node.
PROJECT_DIR = Path(os.environ.get("ENTROPY_SEARCH_DIR", "~/entropy-search")).expanduser()


def run_sweep(args: list[str]) -> int:
    """Run `entropy-search sweep <args>`; `args` are the arguments after `--`, e.g. ["tune_configs/quickstart.yaml"]."""
    from entropy_search import cli

    return cli.main(["sweep", *args])


def git_commit(checkout: Path) -> str:
    """The commit checked out in `checkout`, read from .git without needing a git binary ("" if none)."""
    git = checkout / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[len("ref: ") :]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return ""


def resolve_paths(args: list[str], checkout: Path) -> list[str]:
    """Arguments naming a file that is missing here but present in the checkout point there instead."""
    resolved = []
    for arg in args:
        if (
            not arg.startswith("-")
            and not os.path.isabs(arg)
            and not os.path.exists(arg)
            and (checkout / arg).exists()
        ):
            arg = str(checkout / arg)
        resolved.append(arg)
    return resolved


def package_dir() -> str:
    """The folder of the entropy_search package this process will run (found, not imported): the synced
    checkout under `ray submit`, the job's copy of the working directory under `ray job submit`."""
    spec = importlib.util.find_spec("entropy_search")
    if spec is None or not spec.origin:
        return ""
    return str(Path(spec.origin).resolve().parent)


def check_tracking_server(uri: str) -> str | None:
    """None if an HTTP tracking server answers at `uri` (other URI schemes are not checked), else why not."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10):
            return None
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("RAY_ADDRESS", "auto")
    tracking_uri = os.environ.setdefault("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    problem = check_tracking_server(tracking_uri)
    if problem:
        print(
            f"submit_sweep.py: no MLflow tracking server answers at {tracking_uri} ({problem}). "
            "On the cluster it is started by head_start_ray_commands (cluster/start_mlflow.sh); "
            "see ~/mlflow/server.log on the head node, or set MLFLOW_TRACKING_URI.",
            file=sys.stderr,
        )
        return 2
    commit = git_commit(PROJECT_DIR)
    if commit:
        os.environ.setdefault("ENTROPY_SEARCH_GIT_COMMIT", commit)
    args = resolve_paths(args, PROJECT_DIR)
    print(
        f"submit_sweep.py: ray={os.environ['RAY_ADDRESS']} mlflow={tracking_uri} "
        f"checkout={PROJECT_DIR} commit={commit or '?'} package={package_dir() or '?'} args={args}",
        flush=True,
    )
    return run_sweep(args)


if __name__ == "__main__":
    sys.exit(main())
