"""The bench's own Kafka clients: topics, a producer that floods or paces, and a collector that
timestamps every output record as it arrives."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.data import Message


async def create_topics(bootstrap: str, names: Sequence[str], partitions: int) -> None:
    """Create the topics that do not exist, and wait until every partition has a leader."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(n, partitions, 1) for n in names if n not in existing]
        if new:
            await admin.create_topics(new)
        for _ in range(100):
            described = await admin.describe_topics(list(names))
            leaders = [p["leader"] for d in described for p in d["partitions"]]
            if len(leaders) == partitions * len(names) and all(x >= 0 for x in leaders):
                return
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, prefixes: Sequence[str]) -> None:
    """Delete every topic whose name starts with one of `prefixes` (best effort)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(tuple(prefixes))]
        if names:
            with contextlib.suppress(Exception):
                await admin.delete_topics(names)
    finally:
        await admin.close()


@dataclass(slots=True)
class Received:
    key: bytes
    at: float  # time.time() when the bench consumer got it
    value: bytes
    headers: dict[str, bytes]

    def event(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.value)
        return data


@dataclass
class Collector:
    """Reads `topic` (of `partitions` partitions, all assigned by hand, no group) from the
    beginning and keeps the first record of each key with its arrival time. With
    `by_source_id` a record's key is its verdict event's `source_id` instead of its Kafka key
    (a prompt's and its response's verdicts share the conversation's Kafka key)."""

    bootstrap: str
    topic: str
    partitions: int
    keep_values: bool = True
    by_source_id: bool = False
    records: dict[bytes, Received] = field(default_factory=dict)
    duplicates: int = 0
    _consumer: AIOKafkaConsumer | None = None
    _task: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    on_record: Callable[[int], None] | None = None

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=20,
            max_partition_fetch_bytes=8 << 20,
        )
        await consumer.start()
        consumer.assign([TopicPartition(self.topic, p) for p in range(self.partitions)])
        await consumer.seek_to_beginning()
        self._consumer = consumer
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=200, max_records=5000)
            now = time.time()
            got = 0
            for recs in batches.values():
                for r in recs:
                    key = self._key(r.key, r.value)
                    if key in self.records:
                        self.duplicates += 1
                        continue
                    self.records[key] = Received(
                        key,
                        now,
                        r.value if self.keep_values else b"",
                        dict(r.headers) if self.keep_values else {},
                    )
                    got += 1
            if got:
                if self.on_record is not None:
                    self.on_record(got)
                self._changed.set()

    def _key(self, key: bytes | None, value: bytes) -> bytes:
        if self.by_source_id:
            try:
                return str(json.loads(value)["source_id"]).encode()
            except (ValueError, KeyError, TypeError):
                return b""
        return key or b""

    async def wait_for(self, keys: Sequence[bytes], timeout: float) -> bool:
        """True once every key in `keys` arrived; False after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        pending = [k for k in keys if k not in self.records]
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.5)):
                    await self._changed.wait()
            pending = [k for k in pending if k not in self.records]
        return True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


def new_producer(bootstrap: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)


async def flood(
    producer: AIOKafkaProducer,
    topic: str,
    messages: Sequence[Message],
    on_sent: Callable[[int], None] | None = None,
) -> tuple[float, dict[bytes, float]]:
    """Send every message as fast as the client takes them; returns (start time, send times)."""
    sent: dict[bytes, float] = {}
    started = time.time()
    futures = []
    for i, m in enumerate(messages):
        sent[m.key] = time.time()
        futures.append(await producer.send(topic, m.value(), key=m.key))
        if on_sent is not None and i % 500 == 499:
            on_sent(500)
            await asyncio.sleep(0)
    await asyncio.gather(*futures)
    return started, sent


async def paced(
    producer: AIOKafkaProducer,
    topic: str,
    messages: Sequence[Message],
    rate: float,
    on_sent: Callable[[int], None] | None = None,
) -> tuple[float, dict[bytes, float]]:
    """Send message i at `start + i / rate` (an open loop: late sends go at once, the schedule
    never waits for the system under test); returns (start time, send times)."""
    sent: dict[bytes, float] = {}
    futures = []
    t0 = time.monotonic()
    started = time.time()
    i = 0
    while i < len(messages):
        now = time.monotonic()
        due = int((now - t0) * rate) + 1
        burst = 0
        while i < min(due, len(messages)):
            m = messages[i]
            sent[m.key] = time.time()
            futures.append(await producer.send(topic, m.value(), key=m.key))
            i += 1
            burst += 1
        if on_sent is not None and burst:
            on_sent(burst)
        if i < len(messages):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
    await asyncio.gather(*futures)
    return started, sent


def created_at(event: dict[str, Any]) -> float | None:
    raw = event.get("event_time")
    if not raw:
        return None
    return datetime.fromisoformat(str(raw)).timestamp()
