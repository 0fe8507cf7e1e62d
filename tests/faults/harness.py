"""Fault-test helpers: the worker with a fault-injecting backend, streams of chat events, reading
the verdicts back, and the worker process's memory."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from engine.prompt import split_model_input
from tests.conftest import REPO_ROOT
from tests.service.harness import Worker


class FaultWorker(Worker):
    """`tests.faults.launcher` (run_worker with a FaultyBackend) instead of `guardstream serve`."""

    def __init__(self, env: dict[str, str], log_path: Path, control: Path) -> None:
        super().__init__({**env, "FAULTS_CONTROL_FILE": str(control)}, log_path)
        self.control = control

    def start(self, timeout: float = 90) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.faults.launcher"],
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
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready in {timeout}s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_kib(self) -> int:
        """Resident set size of the worker process (VmRSS in /proc/<pid>/status), in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS line")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str | None:
        status, body = self.get("/metrics")
        return body.decode(errors="replace") if status == 200 else None


@dataclass(frozen=True)
class Sample:
    prompt: str
    response: str | None


def replay_samples(replay_dir: Path) -> list[Sample]:
    """Every distinct recorded (prompt, response) in the replay folder's files."""
    seen: dict[str, Sample] = {}
    for path in sorted(replay_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                model_input = json.loads(line)["prompt"]
                if model_input not in seen:
                    prompt, response = split_model_input(model_input)
                    seen[model_input] = Sample(prompt, response)
    return list(seen.values())


def prompt_events(
    samples: list[Sample], n: int, *, prefix: str = "m", conversations: int = 97
) -> list[tuple[bytes, bytes]]:
    """`n` prompt events (ids `<prefix>0`...), cycling through the samples' prompts."""
    out = []
    for i in range(n):
        conv = f"conv-{i % conversations}"
        text = samples[i % len(samples)].prompt
        body = {"id": f"{prefix}{i}", "conversation_id": conv, "text": text}
        out.append((conv.encode(), json.dumps(body).encode()))
    return out


def duplicates(ids: list[str]) -> int:
    """Verdicts beyond the first per input."""
    return sum(c - 1 for c in Counter(ids).values())


async def read_topic(
    bootstrap: str,
    topic: str,
    *,
    until: int,
    timeout: float,
    committed_only: bool = True,
    settle: float = 1.0,
    key: str = "source_id",
) -> list[dict[str, Any]]:
    """Every record of `topic` from the start (JSON values), read until `until` distinct values of
    `key` were seen (then `settle` s more, to catch late duplicates) or `timeout`."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed" if committed_only else "read_uncommitted",
        max_partition_fetch_bytes=16 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    out: list[dict[str, Any]] = []
    distinct: set[str] = set()
    try:
        deadline = time.monotonic() + timeout
        settle_until: float | None = None
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                for r in records:
                    value = json.loads(r.value)
                    out.append(value)
                    distinct.add(json.dumps(value.get(key), sort_keys=True))
            if len(distinct) >= until and settle_until is None:
                settle_until = time.monotonic() + settle
            if settle_until is not None and time.monotonic() >= settle_until:
                break
    finally:
        await consumer.stop()
    return out


async def committed_lag(bootstrap: str, group: str, topic: str) -> int:
    """Messages of `topic` not yet committed by consumer group `group`."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        ends = await consumer.end_offsets(tps)
        offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
        done = {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}
        return sum(ends[tp] - done.get(tp, 0) for tp in tps)
    finally:
        await consumer.stop()
        await admin.close()


async def wait_for(predicate: Any, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(interval)
    return False


class Progress:
    """Counts the records of a topic as they arrive (uncommitted ones included), in the
    background, so a test can act when a stream is part way through."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.count = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Progress:
        consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            isolation_level="read_uncommitted",
        )
        await consumer.start()

        async def run() -> None:
            try:
                while True:
                    batch = await consumer.getmany(timeout_ms=200)
                    self.count += sum(len(records) for records in batch.values())
            finally:
                await consumer.stop()

        self._task = asyncio.get_running_loop().create_task(run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def reach(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.count < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.topic}: {self.count} records after {timeout}s, not {n}")
            await asyncio.sleep(0.05)
