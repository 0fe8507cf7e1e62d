"""A Kafka broker and a Redis server of the fault tests' own (deploy/local/up on other ports, in a
temporary state folder), which the tests may stop and start at will: the shared ones at 9092 and
6379 are never touched."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.conftest import REPO_ROOT
from tests.service.harness import free_port

LOCAL = REPO_ROOT / "deploy" / "local"


class OwnServices:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.kafka_port = free_port()
        self.controller_port = free_port()
        while self.controller_port == self.kafka_port:
            self.controller_port = free_port()
        self.redis_port = free_port()
        self.env = {
            **os.environ,
            "GUARDSTREAM_LOCAL_STATE": str(state),
            "GUARDSTREAM_LOCAL_KAFKA_PORT": str(self.kafka_port),
            "GUARDSTREAM_LOCAL_KAFKA_CONTROLLER_PORT": str(self.controller_port),
            "GUARDSTREAM_LOCAL_REDIS_PORT": str(self.redis_port),
        }
        shared_libs = LOCAL / ".state" / "kafka-libs"
        if (shared_libs / ".pom.sha256").exists():
            # the jars the shared broker already fetched: no second Maven download
            self.env["GUARDSTREAM_LOCAL_KAFKA_LIBS"] = str(shared_libs)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def _run(self, script: str, *args: str, timeout: float = 180) -> float:
        """Run deploy/local/<script>; return how long it took."""
        t0 = time.monotonic()
        proc = subprocess.run(
            [str(LOCAL / script), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"deploy/local/{script} {' '.join(args)} failed:\n{proc.stderr}")
        return time.monotonic() - t0

    def up(self, *services: str) -> float:
        return self._run("up", *services)

    def down(self, *services: str) -> float:
        return self._run("down", *services)

    def pid(self, service: str) -> int | None:
        path = self.state / service / f"{service}.pid"
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        self._run("down", "--clean")
