"""Per-request admission: an in-flight-batching backend gets each miss on its own, at once.

The fake engine below generates every input of a call concurrently (as an in-flight engine
does) but answers a call only when all its inputs are done (as any `generate` call does), and an
input named "long-*" decodes until the test releases it. With per-request admission the short
requests finish while the long one is still decoding; with fixed batches they share its batch
and wait for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from engine.backends.base import Backend, Batching, Generation, Stops
from engine.guard import Guard, ModerationResult, admission_mode
from schemas.verdict import ModerationRequest

ANSWER = "# Task 1\n## Reasoning Step 1: fine.\n---\n\nAnswers: \nRequest: unharmful\n"


class InflightEngine(Backend):
    name = "fake-inflight"
    batching = "inflight"

    def __init__(self) -> None:
        super().__init__("fake", "r1")
        self.release = asyncio.Event()
        self.calls: list[int] = []
        self.running = 0
        self.max_running = 0

    async def _one(self, text: str) -> Generation:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if "long-" in text or "hold-" in text:
                await self.release.wait()
            else:
                await asyncio.sleep(0)
            return Generation(ANSWER, tokens=12)
        finally:
            self.running -= 1

    async def generate(
        self, inputs: Sequence[str], max_new_tokens: int, stop: Stops = None
    ) -> list[Generation]:
        self.calls.append(len(inputs))
        return list(await asyncio.gather(*(self._one(text) for text in inputs)))


class StaticEngine(InflightEngine):
    batching: Batching = "static"


async def _submit(guard: Guard, prompts: list[str]) -> list[asyncio.Future[ModerationResult]]:
    return [await guard.submit(ModerationRequest(prompt=p, response="ok")) for p in prompts]


async def _settle(futures: Sequence[asyncio.Future[ModerationResult]]) -> None:
    async with asyncio.timeout(5):
        await asyncio.gather(*futures)


async def test_auto_admits_per_request_for_an_inflight_backend_and_batches_for_a_static_one() -> (
    None
):
    assert admission_mode("auto", InflightEngine()) == "request"
    assert admission_mode("auto", StaticEngine()) == "batch"
    assert admission_mode("batch", InflightEngine()) == "batch"
    assert Guard(InflightEngine()).admission == "request"


async def test_a_long_generation_does_not_hold_back_short_ones() -> None:
    engine = InflightEngine()
    guard = Guard(engine, max_batch_size=32, max_wait_ms=50, max_sequences=64)
    await guard.start()
    [long_one] = await _submit(guard, ["long-0"])
    shorts = await _submit(guard, [f"short-{i}" for i in range(10)])
    await _settle(shorts)  # while the long one is still decoding
    assert not long_one.done()
    assert all(not r.result().verdict.engine_error for r in shorts)
    engine.release.set()
    await _settle([long_one])
    assert engine.calls == [1] * 11, "every request is a call of its own"
    await guard.close()


async def test_with_fixed_batches_short_requests_wait_for_the_long_one_in_theirs() -> None:
    engine = InflightEngine()
    guard = Guard(engine, max_batch_size=32, max_wait_ms=50, admission="batch")
    await guard.start()
    futures = await _submit(guard, ["long-0", *(f"short-{i}" for i in range(10))])
    async with asyncio.timeout(5):
        while not engine.calls:
            await asyncio.sleep(0.01)
    assert engine.calls == [11]
    await asyncio.sleep(0.05)  # the shorts are long done in the engine, not yet answered
    assert not any(f.done() for f in futures)
    engine.release.set()
    await _settle(futures)
    await guard.close()


async def test_the_engine_never_runs_more_than_the_sequence_budget() -> None:
    engine = InflightEngine()
    guard = Guard(engine, max_sequences=3, timeout_s=30)
    await guard.start()
    # Submitting waits once the engine is full (backpressure): each from a task of its own.
    futures = [
        asyncio.ensure_future(guard.moderate(ModerationRequest(prompt=f"hold-{i}", response="ok")))
        for i in range(10)
    ]
    async with asyncio.timeout(5):
        while engine.running < 3:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # give a fourth the chance it must not get
    assert engine.running == 3
    engine.release.set()
    await _settle(futures)
    assert engine.max_running == 3 and sum(engine.calls) == 10
    await guard.close()


def test_a_sequence_budget_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_sequences"):
        Guard(InflightEngine(), max_sequences=0)


async def test_per_request_calls_share_their_cache_writes() -> None:
    """Each miss is a model call of its own; their verdicts are still written in few round
    trips, not one per message."""
    from engine.cache import MemoryVerdictCache

    class CountingCache(MemoryVerdictCache):
        writes: list[int] = []

        async def set_many(self, items: Sequence[tuple[str, Any]]) -> None:
            self.writes.append(len(items))
            await super().set_many(items)

    cache = CountingCache()
    guard = Guard(InflightEngine(), cache=cache, max_sequences=64)
    await guard.start()
    futures = [await guard.submit(ModerationRequest(prompt=f"short-{i}")) for i in range(20)]
    await _settle(futures)
    await guard.close()
    assert sum(cache.writes) == 20 and len(cache.writes) <= 4, cache.writes
