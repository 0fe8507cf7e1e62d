"""The `guardstream` command line."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: Subcommand modules under service/commands, each with `register(subparsers)`.
COMMANDS = [
    "schemas_cmd",
    "evaluate_cmd",
    "engine_cmd",
    "serve_cmd",
    "moderate_cmd",
    "bench_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guardstream", description="Streaming moderation of LLM chat with GuardReasoner."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"service.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
