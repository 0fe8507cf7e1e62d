"""Exactly-once stays exactly-once under cancellation: a lane's transaction cancelled (at
shutdown or revocation) after its records were written and before its offset was committed is
aborted, so a read_committed reader never sees those records; the next attempt commits records
and offset together. Against the local broker, with a real aiokafka transactional producer in
the place where Faust keeps it (`service.eos` reads `_transaction_producers` and `_trn_locks`)."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from service.eos import TransactionalPublisher
from service.messages import Outgoing
from tests.service.harness import create_topics

pytestmark = [pytest.mark.integration]


async def _read(bootstrap: str, topic: str, isolation: str) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", isolation_level=isolation
    )
    await consumer.start()
    try:
        out: list[bytes] = []
        while True:
            batch = await consumer.getmany(timeout_ms=1500)
            if not batch:
                return out
            out += [r.value for records in batch.values() for r in records]
    finally:
        await consumer.stop()


async def test_a_cancelled_transaction_is_aborted_and_the_retry_commits_once(
    kafka_bootstrap: str,
) -> None:
    u = uuid.uuid4().hex[:10]
    source, out, group = f"eos{u}.in", f"eos{u}.out", f"eos-{u}"
    await create_topics(kafka_bootstrap, [source, out], partitions=1)
    tid = f"{group}-0-0"
    txp = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=tid)
    await txp.start()
    await txp.begin_transaction()  # Faust keeps one open between commits
    app: Any = SimpleNamespace(
        conf=SimpleNamespace(id=group),
        assignor=SimpleNamespace(group_for_topic=lambda topic: 0),
        producer=SimpleNamespace(
            _transaction_producers={tid: txp}, _trn_locks={tid: asyncio.Lock()}
        ),
    )
    publisher = TransactionalPublisher(app)
    events = [SimpleNamespace(message=SimpleNamespace(topic=source, partition=0, offset=41))]
    records = [Outgoing(out, b"k", f"verdict-{i}".encode()) for i in range(20)]
    acked: list[Any] = []

    async def ack(event: Any) -> None:
        acked.append(event)

    # The offsets step blocks: the records are written, nothing is committed yet; then the lane
    # is cancelled, as at shutdown.
    real_offsets = txp.send_offsets_to_transaction
    reached = asyncio.Event()

    async def stuck(*args: Any, **kwargs: Any) -> None:
        reached.set()
        await asyncio.Event().wait()

    txp.send_offsets_to_transaction = stuck  # type: ignore[method-assign]
    try:
        task = asyncio.create_task(publisher.publish(records, events, ack))
        await asyncio.wait_for(reached.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert publisher.aborted == 1 and publisher.transactions == 0 and not acked
        assert await _read(kafka_bootstrap, out, "read_committed") == []
        # they were written (a read_uncommitted reader sees the aborted copies)
        assert len(await _read(kafka_bootstrap, out, "read_uncommitted")) == 20

        txp.send_offsets_to_transaction = real_offsets  # type: ignore[method-assign]
        await publisher.publish(records, events, ack)
        assert publisher.transactions == 1 and acked == events
        committed = await _read(kafka_bootstrap, out, "read_committed")
        assert committed == [r.value for r in records]  # once, in order
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(group)
        finally:
            await admin.close()
        assert offsets[TopicPartition(source, 0)].offset == 42  # the offset, in the same commit
    finally:
        await txp.stop()
