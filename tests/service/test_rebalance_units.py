"""`service.resume.ResumeGuard` on a real (unstarted) aiokafka consumer, and the hand-back of
events an agent held through a rebalance."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from service.app import GuardApp
from service.resume import ResumeGuard

PROMPTS, RESPONSES, CHANGELOG = "in.prompts", "in.responses", "app-recent-prompts-changelog"


def _kafka(assigned: set[TopicPartition]) -> AIOKafkaConsumer:
    """An aiokafka consumer that is never started, with `assigned` as its assignment."""
    kafka = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1")
    kafka._subscription.assign_from_user(assigned)
    return kafka


def _faust_consumer(kafka: AIOKafkaConsumer) -> tuple[Any, list[set[Any]]]:
    """The parts of Faust's aiokafka consumer the guard uses: its thread (its loop, its aiokafka
    consumer) and the thread's rebalance listener, which records what it was told."""
    heard: list[set[Any]] = []

    async def on_partitions_assigned(assigned: Any) -> None:
        heard.append(set(assigned))

    async def _fetch_records(kafka: Any, partitions: Any, **kwargs: Any) -> Any:
        return partitions  # what aiokafka's fetched_records would be given

    thread = SimpleNamespace(
        thread_loop=asyncio.get_running_loop(),
        _ensure_consumer=lambda: kafka,
        _rebalance_listener=SimpleNamespace(on_partitions_assigned=on_partitions_assigned),
        _fetch_records=_fetch_records,
    )
    return SimpleNamespace(_thread=thread), heard


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_input_partitions_are_paused_in_aiokafka_from_assignment_to_rebalance_end() -> None:
    """aiokafka itself must return no record of an input partition between the assignment and
    the end of the rebalance (Faust's own pause is only its bookkeeping: aiokafka goes on
    handing back, and consuming, what it prefetched); the changelogs recovery reads stay
    fetchable."""
    inputs = {TopicPartition(PROMPTS, 0), TopicPartition(RESPONSES, 0)}
    changelog = {TopicPartition(CHANGELOG, 0)}
    kafka = _kafka(inputs | changelog)
    guard = ResumeGuard((PROMPTS, RESPONSES))
    consumer, heard = _faust_consumer(kafka)
    guard.install(consumer)

    await consumer._thread._rebalance_listener.on_partitions_assigned(inputs | changelog)
    assert kafka.paused() == inputs
    assert heard == [inputs | changelog]  # Faust hears of the assignment after the pause

    guard.on_rebalance_end()  # after the seek
    await _settle()
    assert kafka.paused() == set()
    assert (guard.paused, guard.resumed) == (1, 1)


async def test_a_rebalance_that_began_again_keeps_its_partitions_paused_until_its_own_end() -> None:
    moved, kept = TopicPartition(RESPONSES, 1), TopicPartition(RESPONSES, 0)
    kafka = _kafka({kept, moved})
    guard = ResumeGuard((PROMPTS, RESPONSES))
    consumer, _ = _faust_consumer(kafka)
    guard.install(consumer)
    listener = consumer._thread._rebalance_listener

    await listener.on_partitions_assigned({kept, moved})
    guard.on_rebalance_end()  # its resumption is queued to the consumer's thread...
    kafka._subscription.assign_from_user({kept})  # ...which meanwhile got a new assignment
    await listener.on_partitions_assigned({kept})
    await _settle()
    assert kafka.paused() == {kept}, "the newer assignment is not resumed by the older end"

    guard.on_rebalance_end()
    await _settle()
    assert kafka.paused() == set()


async def test_a_rebalance_ending_after_the_consumer_thread_stopped_does_not_raise() -> None:
    tp = TopicPartition(RESPONSES, 0)
    kafka = _kafka({tp})
    guard = ResumeGuard((PROMPTS, RESPONSES))
    consumer, _ = _faust_consumer(kafka)
    guard.install(consumer)
    await consumer._thread._rebalance_listener.on_partitions_assigned({tp})
    stopped = asyncio.new_event_loop()
    stopped.close()
    consumer._thread.thread_loop = stopped  # shutdown: the thread's loop is closed
    guard.on_rebalance_end()
    assert guard.resumed == 0


async def test_aiokafka_is_never_asked_for_every_partition_when_faust_has_none_active() -> None:
    """aiokafka's `fetched_records(partitions)` returns every prefetched partition when
    `partitions` is empty; Faust passes its live active set, which is empty while it has paused
    everything (during a recovery), and then drops what comes back."""
    kafka = _kafka({TopicPartition(CHANGELOG, 0)})
    guard = ResumeGuard((PROMPTS, RESPONSES))
    consumer, _ = _faust_consumer(kafka)
    guard.install(consumer)
    active: set[Any] = set()
    view = await consumer._thread._fetch_records(kafka, active, timeout=1.0, max_records=10)
    tp = TopicPartition(CHANGELOG, 0)
    assert view and tp not in view  # "some partitions, none of them this one"
    active.add(tp)  # resumed while aiokafka waits for records: seen at once
    assert tp in view
    assert await consumer._thread._fetch_records(kafka, None) is None  # client-only: no filter


def test_the_app_installs_the_guard_on_its_consumer_thread_listener() -> None:
    app = GuardApp("guardstream-unit-resume", broker="kafka://127.0.0.1:1", store="memory://")
    app.resume_guard = ResumeGuard((PROMPTS, RESPONSES))
    listener = app.consumer._thread._rebalance_listener
    assert listener.on_partitions_assigned.__qualname__.startswith("ResumeGuard.install")


async def test_an_event_whose_agent_waited_through_a_rebalance_is_handed_back(
    tmp_path: Path,
) -> None:
    """The agent took event B and waited for room (the topic's bound is full with A, which
    waits for its prompt). A rebalance begins: A is handed back, which makes room, and B's wait
    ends, in an assignment that is over: B must go back too (its partition may be another
    worker's now), neither published nor acknowledged. Before, B went into a new lane and was
    published and committed: the partition's next owner then skipped what lay before it."""
    import json

    from tests.security.support import FakeEvent, FakeMessage, Harness, settings

    h = Harness(settings(tmp_path, max_pending=1, moderate="responses"))
    await h.guard.start()
    topic = h.settings.topic_responses
    rebalanced = False
    h.processor.current = lambda message: not rebalanced

    def response(i: int, **extra: str) -> bytes:
        fields = {"id": f"r{i}", "conversation_id": f"c{i}", "reply_to": f"p{i}", "text": "hi"}
        return json.dumps({**fields, **extra}).encode()

    a = FakeEvent(response(0), b"c0", FakeMessage(topic, 1, 0))  # waits for its prompt
    b = FakeEvent(response(1, prompt="Hello?"), b"c1", FakeMessage(topic, 2, 0))
    await h.processor.on_response(a, h._ack)
    blocked = asyncio.create_task(h.processor.on_response(b, h._ack))
    await asyncio.sleep(0.05)
    assert not blocked.done(), "B waits for room"
    rebalanced = True
    assert h.processor.give_back() == 1  # A goes back: room for B
    await asyncio.wait_for(blocked, 5)
    assert await h.processor.close(timeout=5)
    await h.guard.close()
    assert h.sent == [] and h.acked == []
    assert b.message.acked  # released for Faust's wait at the rebalance, committing nothing


async def test_the_pairing_clock_moves_a_read_partition_to_its_fetch_time_not_to_now(
    tmp_path: Path,
) -> None:
    """A prompts partition read to its end moves its watermark to the time of the fetch that
    found it so; under load that fetch can be seconds old, and a prompt appended since must still
    be waited for (9 responses of a loaded scale-out run were moderated without their prompt,
    which was already in Kafka, while the watermark went by the wall clock)."""
    import time

    from faust.types import TP

    from engine.backends.replay import ReplayBackend
    from engine.guard import Guard
    from service.app import Runtime
    from service.config import Settings

    (tmp_path / "x.jsonl").write_text("")
    settings = Settings(replay_path=tmp_path, metrics_exporter="none", app_id="gs-clock-test")
    runtime = Runtime(settings, Guard(ReplayBackend(tmp_path)), partitions=1)
    tp = TP(settings.topic_prompts, 0)
    fetched_at = time.time() - 30.0
    kafka = SimpleNamespace(last_poll_timestamp=lambda _tp: int(fetched_at * 1000))
    runtime.app._consumer = SimpleNamespace(
        assignment=lambda: {tp},
        highwater=lambda _tp: 5,
        _committed_offset={tp: 5},  # everything stored there is read and committed
        _thread=SimpleNamespace(_ensure_consumer=lambda: kafka),
    )
    runtime.app.rebalancing = False
    runtime.started.set()
    runtime._tick_pairing_clock()
    assert abs(runtime.store.watermarks[0] - fetched_at) < 0.01
