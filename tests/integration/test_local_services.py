"""The local Kafka broker and Redis server that deploy/local/up starts really answer."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

pytestmark = pytest.mark.integration


async def test_kafka_produce_and_consume_round_trip(kafka_bootstrap: str, unique: str) -> None:
    topic = f"test.roundtrip.{unique}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        sent = {}
        for i in range(20):
            md = await producer.send_and_wait(
                topic, f"value-{i}".encode(), key=f"k{i % 4}".encode()
            )
            sent[f"value-{i}"] = (md.partition, md.offset)
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"test-group-{unique}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    got = {}
    try:
        async with asyncio.timeout(30):
            while len(got) < len(sent):
                batch = await consumer.getmany(timeout_ms=1000)
                for records in batch.values():
                    for r in records:
                        got[r.value.decode()] = (r.partition, r.offset)
        await consumer.commit()
        committed = await consumer.committed(TopicPartition(topic, 0))
    finally:
        await consumer.stop()
    assert got == sent
    # The consumer group's commit reached the broker's group coordinator.
    assert committed is not None and committed > 0


async def test_kafka_transactions_commit_and_abort(kafka_bootstrap: str, unique: str) -> None:
    """Exactly-once processing rests on transactions: a read_committed consumer sees only the
    committed one."""
    topic = f"test.txn.{unique}"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=f"tx-{unique}")
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send_and_wait(topic, b"committed")
        await producer.begin_transaction()
        await producer.send_and_wait(topic, b"aborted")
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send_and_wait(topic, b"end")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        async with asyncio.timeout(30):
            while b"end" not in values:
                batch = await consumer.getmany(timeout_ms=1000)
                values += [r.value for records in batch.values() for r in records]
    finally:
        await consumer.stop()
    assert values == [b"committed", b"end"]


async def test_redis_set_and_get(redis_url: str, unique: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        key = f"guardstream:test:{unique}"
        assert await client.set(key, b"verdict", ex=30)
        assert await client.get(key) == b"verdict"
        assert 0 < await client.ttl(key) <= 30
        await client.delete(key)
        assert await client.get(key) is None
    finally:
        await client.aclose()
