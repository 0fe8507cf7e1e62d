"""Pieces of the service that need no broker: the pairing store, lanes, settings, messages."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine.guard import ModerationResult
from schemas.verdict import Verdict
from service.config import Settings, SettingsError
from service.lanes import Item, Lane
from service.messages import Outgoing, is_flagged
from service.pairing import PromptStore


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _store(ttl: float = 60, size: int = 100) -> tuple[PromptStore, list[Any], _Clock]:
    log: list[Any] = []
    clock = _Clock()
    store = PromptStore(
        {}, lambda p, k, v: log.append((p, k, v)), ttl_s=ttl, max_entries=size, clock=clock
    )
    return store, log, clock


async def test_prompt_store_writes_changelog_and_expires() -> None:
    store, log, clock = _store(ttl=10)
    store.put("p1", "hello", 3)
    assert store.get("p1") == "hello"
    assert log == [(3, "p1", {"text": "hello", "ts": 1000.0, "p": 3})]
    clock.now += 11
    assert store.get("p1") is None
    assert store.sweep() == 1
    assert log[-1] == (3, "p1", None)  # the deletion reaches the changelog too
    assert len(store) == 0


async def test_prompt_store_bounded_by_size_drops_oldest() -> None:
    store, _, clock = _store(size=3)
    for i in range(5):
        clock.now += 1
        store.put(f"p{i}", f"t{i}", 0)
    assert len(store) == 3
    assert store.get("p0") is None and store.get("p4") == "t4"


async def test_full_prompt_store_is_swept_in_steps_not_on_every_put() -> None:
    store, log, clock = _store(ttl=10_000, size=100)
    for i in range(101):
        clock.now += 1
        store.put(f"p{i}", f"t{i}", 0)
    # over the bound: the oldest go, down to nine tenths of it
    assert len(store) == 90
    assert store.get("p10") is None and store.get("p11") == "t11"
    deletions = sum(1 for _, _, v in log if v is None)
    assert deletions == 11
    for i in range(101, 111):  # back up to the bound: no sweep, nothing deleted
        clock.now += 1
        store.put(f"p{i}", f"t{i}", 0)
    assert len(store) == 100
    assert sum(1 for _, _, v in log if v is None) == deletions


def _rec(n: int) -> Outgoing:
    return Outgoing("out", None, str(n).encode())


async def test_lane_publishes_in_order_and_acks_only_after_the_broker() -> None:
    sent: list[bytes] = []
    acked: list[int] = []
    broker_ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def send(rec: Outgoing) -> asyncio.Future[None]:
        sent.append(rec.value)
        return broker_ack

    async def ack(event: int) -> None:
        acked.append(event)

    lane = Lane("t/0", send, ack)
    slow: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    lane.put(Item(0, future=slow, convert=lambda n: [_rec(n)]))
    lane.put(Item(1, ready=[_rec(100)]))
    await asyncio.sleep(0.05)
    assert sent == [] and acked == []  # the head is not ready: nothing overtakes it
    slow.set_result(7)
    await asyncio.sleep(0.05)
    assert sent == [b"7", b"100"]
    assert acked == []  # produced, but not yet acknowledged by the broker
    broker_ack.set_result(None)
    await asyncio.wait_for(lane.wait_idle(), 1)
    assert acked == [0, 1]
    assert await lane.close(1)


async def test_lane_retries_a_failed_produce_without_acking() -> None:
    attempts = 0
    acked: list[int] = []

    async def send(rec: Outgoing) -> asyncio.Future[None]:
        nonlocal attempts
        attempts += 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if attempts < 3:
            fut.set_exception(ConnectionError("broker down"))
        else:
            fut.set_result(None)
        return fut

    async def ack(event: int) -> None:
        acked.append(event)

    lane = Lane("t/0", send, ack)
    lane.put(Item(5, ready=[_rec(1)]))
    await asyncio.wait_for(lane.wait_idle(), 5)
    assert attempts == 3 and acked == [5]


def test_flagged_policy() -> None:
    harmful = Verdict(request="harmful", found="final")
    safe = Verdict(request="unharmful", found="final")
    broken = Verdict(engine_error="timeout")
    unparsed = Verdict(found="unparsed")
    assert is_flagged(harmful, "fail_open") and is_flagged(harmful, "fail_closed")
    assert not is_flagged(safe, "fail_closed")
    assert is_flagged(broken, "fail_closed") and not is_flagged(broken, "fail_open")
    assert is_flagged(unparsed, "fail_closed") and not is_flagged(unparsed, "fail_open")
    assert ModerationResult(safe, True, "k").cached


def test_bad_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDSTREAM_BATCH_MAX_SIZE", "zero")
    monkeypatch.setenv("GUARDSTREAM_REPLAY_PATH", "/nowhere")
    with pytest.raises(SettingsError, match="GUARDSTREAM_BATCH_MAX_SIZE"):
        Settings.from_env()
    monkeypatch.setenv("GUARDSTREAM_BATCH_MAX_SIZE", "8")
    monkeypatch.setenv("GUARDSTREAM_ENGINE", "openai_http")
    with pytest.raises(SettingsError, match="GUARDSTREAM_OPENAI_BASE_URL"):
        Settings.from_env()
    monkeypatch.setenv("GUARDSTREAM_ENGINE", "tensorflow")
    with pytest.raises(SettingsError, match="GUARDSTREAM_ENGINE"):
        Settings.from_env()


def test_secrets_are_not_echoed_in_setting_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDSTREAM_REPLAY_PATH", "/nowhere")
    monkeypatch.setenv("GUARDSTREAM_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("GUARDSTREAM_KAFKA_SASL_PASSWORD", "hunter2-secret")
    with pytest.raises(SettingsError) as info:
        Settings.from_env()
    assert "GUARDSTREAM_KAFKA_SASL_USERNAME" in str(info.value)
    assert "hunter2" not in str(info.value)
    settings = Settings.from_env(kafka_sasl_username="u")
    assert "hunter2" not in repr(settings)
