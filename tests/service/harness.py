"""A real guardstream worker in a subprocess, and Kafka helpers to feed it and read its output."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.conftest import REPO_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def topic_env(unique: str) -> dict[str, str]:
    return {
        "GUARDSTREAM_APP_ID": f"gs-test-{unique}",
        "GUARDSTREAM_TOPIC_PROMPTS": f"t{unique}.prompts",
        "GUARDSTREAM_TOPIC_RESPONSES": f"t{unique}.responses",
        "GUARDSTREAM_TOPIC_VERDICTS": f"t{unique}.verdicts",
        "GUARDSTREAM_TOPIC_FLAGGED": f"t{unique}.flagged",
        "GUARDSTREAM_TOPIC_DLQ": f"t{unique}.dlq",
    }


class Worker:
    """`guardstream serve` with the given environment; ready when /readyz says so."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = int(env.get("GUARDSTREAM_WEB_PORT") or free_port())
        self.env = {
            **os.environ,
            "GUARDSTREAM_WEB_PORT": str(self.port),
            "GUARDSTREAM_WEB_HOST": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.3)
        raise TimeoutError(f"worker not ready in {timeout}s:\n{self.log_tail()}")

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except OSError:
            return 0, b""

    def ready(self) -> bool:
        return self.get("/readyz")[0] == 200

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


@contextmanager
def running_worker(env: dict[str, str], log_path: Path) -> Iterator[Worker]:
    worker = Worker(env, log_path)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


async def create_topics(bootstrap: str, names: Iterable[str], partitions: int = 4) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, partitions, 1) for n in names])
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, records: Iterable[tuple[bytes | None, bytes]]) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    n = 0
    try:
        futures = []
        for key, value in records:
            futures.append(await producer.send(topic, value, key=key))
            n += 1
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return n


async def consume(
    bootstrap: str, topic: str, expected: int, timeout: float = 120, settle: float = 1.0
) -> list[Any]:
    """Read `topic` from the start until `expected` records came (then `settle` seconds more,
    to catch duplicates) or `timeout`; return the records."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        settle_until: float | None = None
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                out.extend(records)
            if len(out) >= expected and settle_until is None:
                settle_until = time.monotonic() + settle
            if settle_until is not None and time.monotonic() >= settle_until:
                break
    finally:
        await consumer.stop()
    return out


def values(records: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(r.value) for r in records]
