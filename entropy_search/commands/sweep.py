"""`entropy-search sweep tune_configs/<name>.yaml`: a Ray Tune sweep of RL searches, tracked in MLflow.

Each trial is one `entropy-search search` (the same code path) with the trial's axis values; every
run and candidate goes to MLflow (one parent run per sweep, one child run per trial). At the end the
cross-trial summary table is printed and logged with a comparison plot on the parent run.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..store import resolve_tracking_uri
from ..summary import aggregate_rows, format_aggregate
from .search import parse_overrides


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sweep",
        help="run a Ray Tune sweep of searches from tune_configs/<name>.yaml, tracked in MLflow",
        description="Run a sweep: the search config `base` with the `axes` varied (grid and random choices), one "
        "Ray Tune trial per point, each an RL search as `entropy-search search` runs it. Ray starts locally, or "
        "joins a cluster (resources.address or RAY_ADDRESS). Runs, metrics, candidates, plots and models go to "
        "MLflow (mlflow.tracking_uri, else MLFLOW_TRACKING_URI, else ./mlflow.db); browse them with "
        "`entropy-search ui`, print the summary again with `entropy-search report <name>`.",
    )
    parser.add_argument("config", help="sweep YAML (see tune_configs/quickstart.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted sweep (finished trials are kept, unfinished ones continue)")
    parser.add_argument("--retry-failed", action="store_true", help="with --resume: run the failed trials again")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete a previous sweep of the same name first (its MLflow runs stay)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a sweep key, e.g. --set max_concurrent_trials=1 --set base.stop.iterations=5 "
                        "--set 'axes.seed=[0,1]' (repeatable)")
    parser.add_argument("--name", default=None, help="sweep name (overrides `name`)")
    parser.add_argument("--storage-path", default=None, help="folder of sweeps (overrides `storage_path`)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (overrides mlflow.tracking_uri)")
    parser.add_argument("--dry-run", action="store_true", help="validate, print the trials and their resources, exit")
    parser.add_argument("--quiet", action="store_true", help="no Tune progress tables")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..sweep import (  # deferred: Ray Tune and MLflow take seconds to import
        describe,
        load_sweep_config,
        run_sweep,
    )

    overrides = parse_overrides(args.overrides)
    if args.name:
        overrides["name"] = args.name
    if args.storage_path:
        overrides["storage_path"] = args.storage_path
    if args.tracking_uri:
        overrides["mlflow.tracking_uri"] = args.tracking_uri
    sweep = load_sweep_config(args.config, overrides)
    if args.dry_run:
        print(describe(sweep))
        return 0
    result = run_sweep(sweep, resume=args.resume, overwrite=args.overwrite, retry_failed=args.retry_failed,
                       verbose=0 if args.quiet else 1)
    print(summary(result))
    if result["interrupted"]:
        return 130
    return 1 if result["failed"] else 0


def summary(result: dict) -> str:
    rows = result["rows"]
    lines = ["", f"sweep {result['name']}: {len(rows)} trial(s), {result['failed']} failed, "
             f"{result['wall_seconds'] / 60:.1f} min, status {result['status']}", result["table"]]
    agg = aggregate_rows(rows)
    if any(a["n"] > 1 for a in agg):
        lines += ["", "mean ± std over seeds:", format_aggregate(agg)]
    lines += [
        "",
        f"MLflow: experiment {result['experiment']!r}, parent run {result['parent_run_id']} at {result['tracking_uri']}",
        f"summary: {result['summary'].get('md')}  plot: {result['summary'].get('png')}",
        f"browse: entropy-search ui{_uri_flag(result['tracking_uri'])}    "
        f"again: entropy-search report {result['name']}{_uri_flag(result['tracking_uri'])}",
    ]
    if result["interrupted"]:
        lines.append("interrupted: continue with `entropy-search sweep <config> --resume`")
    return "\n".join(lines)


def _uri_flag(uri: str) -> str:
    if uri == resolve_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI")):
        return ""
    return f" --tracking-uri {uri}"


if __name__ == "__main__":
    sys.exit(0)
