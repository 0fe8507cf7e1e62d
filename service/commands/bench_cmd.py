"""`guardstream bench`: the end-to-end benchmark (the `bench` package, run against the local
Kafka and Redis; see `bench/cli.py`)."""

from __future__ import annotations

import argparse
import importlib
from typing import Any


def _bench_cli() -> Any:
    # The bench sits above the service (it starts workers); imported by name so that the
    # service's own imports keep pointing down only.
    return importlib.import_module("bench.cli")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cli = _bench_cli()
    p = sub.add_parser(
        "bench",
        help="benchmark the pipeline end to end on the local Kafka and Redis",
        description=cli.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_arguments(p)
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    rc: int = _bench_cli().run(args)
    return rc
