"""`python -m tests.faults.launcher`: `guardstream serve` with the configured backend wrapped in a
`FaultyBackend`, steered by the control file named in $FAULTS_CONTROL_FILE (settings: the usual
GUARDSTREAM_* environment)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from service.commands.serve_cmd import run_worker
from service.config import Settings, SettingsError
from service.factory import build_backend
from tests.faults.faulty_backend import FaultyBackend


def main() -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as err:
        print(f"guardstream: {err}", file=sys.stderr)
        return 2
    control = Path(os.environ["FAULTS_CONTROL_FILE"])
    return run_worker(settings, FaultyBackend(build_backend(settings), control))


if __name__ == "__main__":
    sys.exit(main())
