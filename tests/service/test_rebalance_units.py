"""`service.resume.ResumeGuard` on the app's real Faust consumer (not started: no broker needed)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from faust.types import TP

from service.app import GuardApp
from service.resume import ResumeGuard

PROMPTS, RESPONSES, CHANGELOG = "in.prompts", "in.responses", "app-recent-prompts-changelog"


def _consumer(assigned: set[TP]) -> tuple[GuardApp, Any]:
    app = GuardApp("guardstream-unit-resume", broker="kafka://127.0.0.1:1", store="memory://")
    app.resume_guard = ResumeGuard((PROMPTS, RESPONSES))
    consumer = app.consumer  # the guard is installed when the app makes its consumer
    consumer.assignment = lambda: assigned
    consumer._set_active_tps(set(assigned))
    return app, consumer


def test_input_partitions_resumed_during_a_rebalance_are_read_only_after_it() -> None:
    """Faust's recovery resumes the input partitions before it seeks them to their committed
    offsets, with the fetcher running; they must stay paused until the rebalance ends (after the
    seek), while the changelog partitions recovery reads are resumed at once."""
    inputs = {TP(PROMPTS, 0), TP(RESPONSES, 0)}
    changelog = {TP(CHANGELOG, 0)}
    app, consumer = _consumer(inputs | changelog)
    app.on_rebalance_start()
    consumer.pause_partitions(inputs | changelog)  # as Faust does when partitions are assigned

    consumer.resume_partitions(changelog)  # recovery reads the changelog
    consumer.resume_partitions(inputs | changelog)  # "Resume stream partitions", then the seek
    assert consumer._active_partitions == changelog
    assert consumer._paused_partitions == inputs
    assert app.resume_guard is not None and app.resume_guard.held_back == 1

    app.on_rebalance_end()  # after the seek
    assert consumer._active_partitions == inputs | changelog
    assert not consumer._paused_partitions


def test_outside_a_rebalance_resumption_passes_and_revoked_partitions_stay_paused() -> None:
    kept, moved = TP(PROMPTS, 0), TP(PROMPTS, 1)
    app, consumer = _consumer({kept, moved})
    app.on_rebalance_start()
    consumer.pause_partitions({kept, moved})
    consumer.resume_partitions({kept, moved})
    consumer.assignment = lambda: {kept}  # a rebalance moved partition 1 away meanwhile
    consumer._set_active_tps({kept})
    app.on_rebalance_end()
    assert consumer._active_partitions == {kept}

    consumer.pause_partitions({kept})  # Faust's flow control, between rebalances
    consumer.resume_partitions({kept})
    assert consumer._active_partitions == {kept}


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
