"""`entropy-search`: one subcommand per module in `entropy_search.commands`.

User errors (EntropySearchError, including bad config) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import EntropySearchError

COMMANDS = ["train", "prune", "search", "measure", "sweep", "report", "ui"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="entropy-search",
        description="Prune CNN channels and blocks with an RL agent under a MAC or latency budget, rewarded by "
                    "agreement with the unpruned network (or spatial entropy, or accuracy).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"entropy_search.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"entropy_search.commands.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except EntropySearchError as exc:
        print(f"entropy-search {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"entropy-search {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
