"""Fixtures shared by the suite: where the local Kafka, Redis and the shared reference data are."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _host_port(value: str) -> tuple[str, int]:
    host, port = value.rsplit(":", 1)
    return host, int(port)


KAFKA_BOOTSTRAP = os.environ.get(
    "GUARDSTREAM_TEST_KAFKA",
    f"127.0.0.1:{os.environ.get('GUARDSTREAM_LOCAL_KAFKA_PORT', '9092')}",
)
REDIS_URL = os.environ.get(
    "GUARDSTREAM_TEST_REDIS",
    f"redis://127.0.0.1:{os.environ.get('GUARDSTREAM_LOCAL_REDIS_PORT', '6379')}/0",
)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def shared_guardreasoner_dir() -> Path | None:
    """The shared GuardReasoner reference data: $GUARDSTREAM_SHARED_DIR, else ../shared/."""
    env = os.environ.get("GUARDSTREAM_SHARED_DIR")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "guardreasoner"
    return path if (path / "predictions").is_dir() else None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = shared_guardreasoner_dir()
    if path is None:
        pytest.skip(
            "GuardReasoner reference data not found: put it at ../shared/guardreasoner or set "
            "GUARDSTREAM_SHARED_DIR"
        )
    return path


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    host, port = _host_port(KAFKA_BOOTSTRAP)
    if not _reachable(host, port):
        pytest.fail(
            f"no Kafka broker at {KAFKA_BOOTSTRAP}: start it with deploy/local/up, or deselect "
            "these tests with -m 'not integration'"
        )
    return KAFKA_BOOTSTRAP


@pytest.fixture(scope="session")
def redis_url() -> str:
    rest = REDIS_URL.split("//", 1)[1].split("/", 1)[0]
    host, port = _host_port(rest)
    if not _reachable(host, port):
        pytest.fail(
            f"no Redis at {REDIS_URL}: start it with deploy/local/up, or deselect these tests "
            "with -m 'not integration'"
        )
    return REDIS_URL


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic names, group ids and key prefixes of one test."""
    return uuid.uuid4().hex[:10]
