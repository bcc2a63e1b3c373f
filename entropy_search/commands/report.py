"""`entropy-search report <sweep>`: the summary table of a sweep, read back from MLflow, and its plot."""

from __future__ import annotations

import argparse
import json

from ..summary import format_aggregate, format_table


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report",
        help="print a sweep's summary table from MLflow and write its comparison plot",
        description="Read a sweep's trials back from MLflow (the parent run and its child runs) and print one line "
        "per trial (axis values, FLOPs and params ratios, reward, held-out and test accuracy before/after "
        "fine-tuning, the uniform and random baselines, cost), the mean over seeds when there are several, and "
        "write the FLOPs-versus-accuracy comparison plot.",
    )
    parser.add_argument("sweep", help="the sweep's name, its folder (<storage_path>/<name>) or its YAML file")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--out", default=None, help="where to write the plot (PNG)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..sweep import report  # deferred: Ray Tune and MLflow take seconds to import

    result = report(args.sweep, tracking_uri=args.tracking_uri, out=args.out)
    if args.json:
        print(json.dumps(result["rows"], indent=2, default=str))
        return 0
    rows = result["rows"]
    print(f"sweep {result['name']} ({result['status']}): {len(rows)} trial(s), parent run {result['parent_run_id']} "
          f"at {result['tracking_uri']}")
    print(format_table(rows, markdown=args.markdown))
    if result["aggregate_table"]:
        print("\nmean ± std over seeds:")
        print(format_aggregate(result["aggregate"], markdown=args.markdown))
    print(f"\nplot: {result['plot']}")
    return 0
