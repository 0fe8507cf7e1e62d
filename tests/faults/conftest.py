"""Fixtures of the fault tests: their own broker and Redis (session), worker environments."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.faulty_backend import write_control
from tests.faults.harness import FaultWorker
from tests.faults.services import OwnServices
from tests.service.conftest import replay_folder
from tests.service.harness import topic_env

#: Prompt benchmarks whose recorded outputs the replay backend answers with.
PROMPT_SETS = ["SimpleSafetyTests", "AegisSafetyTest", "HarmBenchPrompt"]


@pytest.fixture(scope="session")
def own_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnServices]:
    services = OwnServices(tmp_path_factory.mktemp("faults-services"))
    try:
        services.up()
    except Exception:
        services.close()
        raise
    try:
        yield services
    finally:
        services.close()


@pytest.fixture
def replay_dir(tmp_path: Path, shared_dir: Path) -> Path:
    return replay_folder(tmp_path, shared_dir, "1B", PROMPT_SETS)


@pytest.fixture
def fault_env(own_services: OwnServices, replay_dir: Path, unique: str) -> dict[str, str]:
    """The default configuration (MODERATE=both: prompts stored for pairing; cache on), on the
    suite's own broker and Redis; a test in another mode sets it and says so in its name."""
    return {
        **topic_env(unique),
        "GUARDSTREAM_KAFKA_BOOTSTRAP_SERVERS": own_services.bootstrap,
        "GUARDSTREAM_REDIS_URL": own_services.redis_url,
        "GUARDSTREAM_ENGINE": "replay",
        "GUARDSTREAM_REPLAY_PATH": str(replay_dir),
        "GUARDSTREAM_MAX_NEW_TOKENS": "4096",
        "GUARDSTREAM_TOPIC_PARTITIONS": "4",
        "GUARDSTREAM_BATCH_MAX_SIZE": "32",
        "GUARDSTREAM_BATCH_MAX_WAIT_MS": "20",
        "GUARDSTREAM_LOG_LEVEL": "INFO",
        "GUARDSTREAM_LOG_FORMAT": "text",
        "GUARDSTREAM_GRACE_PERIOD_S": "20",
        # the cache is on, in a key space of this test's own: no verdict of another test's
        "GUARDSTREAM_MODEL_REVISION": f"rev-{unique}",
    }


@pytest.fixture
def control(tmp_path: Path) -> Path:
    path = tmp_path / "faults.json"
    write_control(path)
    return path


@pytest.fixture
def make_worker(tmp_path: Path, control: Path) -> Iterator[Callable[..., FaultWorker]]:
    """`make_worker(env, name)`: a FaultWorker (not started); every one is stopped at the end."""
    made: list[FaultWorker] = []

    def make(env: dict[str, str], name: str = "worker") -> FaultWorker:
        worker = FaultWorker(env, tmp_path / f"{name}.log", control)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        if worker.proc is not None:
            worker.stop(timeout=30)


_FIGURES: list[dict[str, object]] = []


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[..., None]:
    """`report(**figures)`: figures of this test for the summary printed at the end of the run
    (and written as JSON lines to $GUARDSTREAM_FAULTS_REPORT when set)."""

    def add(**figures: object) -> None:
        _FIGURES.append({"test": request.node.name, **figures})

    return add


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("fault test figures")
    for row in _FIGURES:
        terminalreporter.write_line(json.dumps(row))
    target = os.environ.get("GUARDSTREAM_FAULTS_REPORT")
    if target:
        with open(target, "a") as fh:
            for row in _FIGURES:
                fh.write(json.dumps(row) + "\n")
