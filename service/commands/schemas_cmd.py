"""`guardstream schemas export DIR`: JSON Schema of every event, generated from the models."""

from __future__ import annotations

import argparse
from pathlib import Path

from schemas.export import export_schemas


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("schemas", help="event formats")
    ssub = p.add_subparsers(dest="schemas_cmd", required=True)
    e = ssub.add_parser("export", help="write the JSON Schema of each event into DIR")
    e.add_argument("directory", type=Path)
    e.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    for path in export_schemas(args.directory):
        print(path)
    return 0
