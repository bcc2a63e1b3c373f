"""CLI subcommands: each module exposes `add_parser(subparsers)`; the parser's `func(args)` runs it."""
