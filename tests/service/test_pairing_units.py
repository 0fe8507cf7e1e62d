"""The event-time join of responses to prompts, the co-partitioning check, and the lanes' failure
and rebalance paths: units without a broker."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiokafka.errors import MessageSizeTooLargeError

from service.copartition import PartitionCheck, java_partition, librdkafka_partition
from service.lanes import Item, Lane
from service.messages import Outgoing
from service.pairing import PromptStore, prompt_key


def _store(grace: float = 5.0, max_wait: float = 30.0) -> PromptStore:
    return PromptStore(
        {}, lambda p, k, v: None, ttl_s=3600, max_entries=1000, grace_s=grace, max_wait_s=max_wait
    )


async def _pending(task: asyncio.Task[Any]) -> bool:
    for _ in range(5):
        await asyncio.sleep(0)
    return not task.done()


async def test_a_waiting_response_is_woken_by_its_prompt() -> None:
    store = _store()
    key = prompt_key("t1", "c1", "p9")
    waiter = asyncio.create_task(store.wait_for(key, 100.0, {1}))
    assert await _pending(waiter)
    store.put(key, "late prompt", 1, 99.0)
    assert await asyncio.wait_for(waiter, 1) == ("late prompt", "waited")
    assert await store.wait_for(key, 100.0, {1}) == ("late prompt", "table")


async def test_a_response_waits_while_the_prompts_stream_is_behind_its_time() -> None:
    store = _store(grace=5.0)
    waiter = asyncio.create_task(store.wait_for(prompt_key(None, "c", "p"), 100.0, {2}))
    # A catch-up backlog: prompts of earlier times keep coming in partition 2.
    for ts in (10.0, 50.0, 100.0, 104.9):
        store.put(prompt_key(None, "c", f"other-{ts}"), "x", 2, ts)
        assert await _pending(waiter), ts
    # Another partition passing the time does not matter.
    store.advance(3, 1000.0)
    assert await _pending(waiter)
    store.advance(2, 105.0)  # the response's time plus the grace: the prompt is not coming
    assert await asyncio.wait_for(waiter, 1) == (None, "passed")


async def test_a_response_whose_prompt_can_be_in_two_partitions_waits_for_both() -> None:
    store = _store(grace=0.0)
    waiter = asyncio.create_task(store.wait_for("k", 10.0, {0, 5}))
    store.advance(0, 20.0)
    assert await _pending(waiter)
    store.advance(5, 20.0)
    assert await asyncio.wait_for(waiter, 1) == (None, "passed")


async def test_a_passed_partition_answers_at_once_and_reset_forgets_watermarks() -> None:
    store = _store(grace=1.0)
    store.advance(4, 50.0)
    assert await store.wait_for("k", 10.0, {4}) == (None, "passed")
    store.reset()  # revoked: the next owner's stream position is unknown here
    waiter = asyncio.create_task(store.wait_for("k", 10.0, {4}))
    assert await _pending(waiter)
    waiter.cancel()


async def test_the_wall_clock_bound_ends_a_wait_whose_partition_never_moves() -> None:
    store = _store(max_wait=0.05)
    assert await store.wait_for("k", 10.0, {7}) == (None, "timeout")
    assert store.waiting == 0


def test_prompt_keys_keep_tenants_and_conversations_apart() -> None:
    keys = {
        prompt_key("acme", "c1", "m1"),
        prompt_key("globex", "c1", "m1"),
        prompt_key(None, "c1", "m1"),
        prompt_key("acme", "c2", "m1"),
    }
    assert len(keys) == 4
    store = _store()
    store.put(prompt_key("acme", "c1", "m1"), "acme's prompt", 0, 1.0)
    assert store.get(prompt_key("globex", "c1", "m1")) is None
    assert store.get(prompt_key("acme", "c1", "m1")) == "acme's prompt"


def test_partitioners_match_the_clients_they_stand_for() -> None:
    # Where Kafka's Java client puts these keys among 1,000 partitions (its Utils.murmur2, then
    # toPositive and modulo), as kafka-python's compatibility test records them.
    keys = (b"", b"a", b"ab", b"abc", b"123456789", b"\x00 ")
    assert [java_partition(k, 1000) for k in keys] == [681, 524, 434, 107, 566, 742]
    import zlib

    assert librdkafka_partition(b"123456789", 1 << 20) == zlib.crc32(b"123456789") % (1 << 20)
    assert zlib.crc32(b"123456789") == 0xCBF43926  # the CRC-32 check value


def test_misrouted_messages_are_counted_and_warned_about_once_a_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    check = PartitionCheck(8, clock=lambda: now[0], warn_every_s=60)
    convs = [f"conv-{i}" for i in range(200)]
    wrong = [
        c
        for c in convs
        if librdkafka_partition(c.encode(), 8) != java_partition(c.encode(), 8)
    ]
    assert wrong
    with caplog.at_level(logging.WARNING, "guardstream.copartition"):
        for c in convs:
            assert check.check("chat.responses", java_partition(c.encode(), 8), c)
        for c in wrong:
            assert not check.check("chat.responses", librdkafka_partition(c.encode(), 8), c)
        now[0] = 61
        check.check("chat.responses", librdkafka_partition(wrong[0].encode(), 8), wrong[0])
    assert check.misrouted[("chat.responses", "crc32")] == len(wrong) + 1
    warnings = [r for r in caplog.records if "chat.responses" in r.getMessage()]
    assert len(warnings) == 2  # one at the first, one after the window
    assert "murmur2_random" in warnings[0].getMessage()
    assert check.expected(wrong[0]) == java_partition(wrong[0].encode(), 8)


def _rec(n: int) -> Outgoing:
    return Outgoing("out", None, str(n).encode())


async def _ok(rec: Outgoing) -> asyncio.Future[None]:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    fut.set_result(None)
    return fut


async def test_giving_up_waiting_responses_keeps_what_is_before_them() -> None:
    acked: list[int] = []

    async def ack(event: int) -> None:
        acked.append(event)

    lane = Lane("t/0", _ok, ack)
    slow: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    waiting: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    lane.put(Item(0, future=slow, convert=lambda n: [_rec(n)]))
    lane.put(Item(1, future=waiting, convert=lambda n: [_rec(n)], waits_prompt=True))
    lane.put(Item(2, ready=[_rec(2)]))
    taken = lane.give_up_waiting()
    assert [i.event for i in taken] == [1, 2]
    slow.set_result(0)
    await asyncio.wait_for(lane.wait_idle(), 1)
    assert acked == [0]  # the item before the waiting one is published; the rest go back
    # An event an agent was still working on arrives after: refused (publishing it would let
    # Faust commit past the events handed back).
    assert lane.put(Item(3, ready=[_rec(3)])) is False
    await asyncio.sleep(0.05)
    assert acked == [0]
    assert await lane.close(1)


async def test_an_error_retrying_cannot_mend_stops_the_lane_unacked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    acked: list[int] = []
    attempts = 0

    async def send(rec: Outgoing) -> asyncio.Future[None]:
        nonlocal attempts
        attempts += 1
        raise MessageSizeTooLargeError("record too large")

    async def ack(event: int) -> None:
        acked.append(event)

    lane = Lane("t/0", send, ack)
    with caplog.at_level(logging.ERROR, "guardstream.lanes"):
        lane.put(Item(5, ready=[_rec(1)]))
        await asyncio.wait_for(lane.wait_idle(), 2)
    assert attempts == 1 and acked == []
    assert lane.failed is not None and "MessageSizeTooLarge" in lane.failed
    assert not lane.healthy and len(lane) == 1
    assert any("retrying cannot mend" in r.getMessage() for r in caplog.records)


async def test_a_lane_failing_to_produce_for_long_is_stalled_then_healthy_again() -> None:
    failing = True
    acked: list[int] = []

    async def send(rec: Outgoing) -> asyncio.Future[None]:
        if failing:
            raise ConnectionError("broker away")
        return await _ok(rec)

    async def ack(event: int) -> None:
        acked.append(event)

    lane = Lane("t/0", send, ack, stall_after_s=0.2)
    lane.put(Item(1, ready=[_rec(1)]))
    for _ in range(100):
        if lane.stalled:
            break
        await asyncio.sleep(0.05)
    assert lane.stalled is not None and "broker away" in lane.stalled and not lane.healthy
    failing = False
    await asyncio.wait_for(lane.wait_idle(), 10)
    assert acked == [1] and lane.healthy


async def test_a_lane_whose_task_dies_says_so() -> None:
    async def ack(event: int) -> None:
        raise RuntimeError("ack exploded")

    lane = Lane("t/3", _ok, ack)
    lane.put(Item(1, ready=[_rec(1)]))
    for _ in range(100):
        if lane.failed:
            break
        await asyncio.sleep(0.01)
    assert lane.failed is not None and "ack exploded" in lane.failed


def test_only_events_the_processor_took_are_ever_committed() -> None:
    """Faust acks the events its stream skips at a rebalance (never processed); the guard
    records no offset for them, and marks them acked so that nothing waits for them."""
    from types import SimpleNamespace

    from service.acks import AckGuard

    recorded: list[int] = []

    def real_ack(message: Any) -> bool:
        recorded.append(message.offset)
        message.acked = True
        return True

    class Message:  # weak-referenceable, as Faust's messages are
        def __init__(self, offset: int) -> None:
            self.offset, self.acked = offset, False

    consumer = SimpleNamespace(ack=real_ack)
    guard = AckGuard()
    guard.install(consumer)
    taken, skipped = Message(7), Message(8)
    guard.take(taken)
    assert consumer.ack(taken) is True
    assert consumer.ack(skipped) is False
    assert recorded == [7]
    assert skipped.acked is True and guard.refused == 1
