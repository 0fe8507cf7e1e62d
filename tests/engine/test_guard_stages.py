"""The guard's two stages: cache hits are answered by their lookup, never by a model slot, and a
miss whose key is already being generated joins that generation."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from engine.backends.base import Backend, Generation, Stops
from engine.cache import MemoryVerdictCache
from engine.guard import Guard
from schemas.verdict import ModerationRequest

pytestmark = pytest.mark.timeout(30)

ANSWER = "Answers: \nRequest: harmful\nCompletion: None\nResponse: None\n"


class GatedBackend(Backend):
    """Holds every batch until `gate` is set; records each batch it was given."""

    name = "gated"

    def __init__(self) -> None:
        super().__init__("gated-guard", "r1")
        self.gate = asyncio.Event()
        self.batches: list[list[str]] = []

    async def generate(
        self, inputs: Sequence[str], max_new_tokens: int, stop: Stops = None
    ) -> list[Generation]:
        self.batches.append(list(inputs))
        await self.gate.wait()
        return [Generation(ANSWER, tokens=8) for _ in inputs]


def _req(text: str) -> ModerationRequest:
    return ModerationRequest(prompt=text)


async def _until(condition, timeout: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


async def _started(*, max_batch_size: int, max_in_flight: int) -> tuple[GatedBackend, Guard]:
    """A started guard with an in-memory cache over a gated backend."""
    backend = GatedBackend()
    guard = Guard(
        backend,
        cache=MemoryVerdictCache(),
        max_batch_size=max_batch_size,
        max_wait_ms=1,
        max_in_flight=max_in_flight,
    )
    await guard.start()
    return backend, guard


async def test_a_hit_is_answered_while_every_model_slot_is_busy() -> None:
    backend, guard = await _started(max_batch_size=2, max_in_flight=1)
    # one verdict in the cache, generated the ordinary way
    backend.gate.set()
    first = await guard.moderate(_req("hello there"))
    assert not first.cached
    backend.gate.clear()

    # the only model slot is taken, and the next model batch is full
    running = [await guard.submit(_req(f"miss {i}")) for i in range(2)]
    await _until(lambda: len(backend.batches) == 2)
    queued = [await guard.submit(_req(f"miss {i}")) for i in range(2, 4)]

    hit = await asyncio.wait_for(await guard.submit(_req("hello there")), 1.0)
    assert hit.cached and hit.verdict == first.verdict
    assert not any(f.done() for f in running + queued), "the model was never let go"
    assert len(backend.batches) == 2, "the hit made no model batch"

    backend.gate.set()
    done = await asyncio.gather(*running, *queued)
    assert [r.cached for r in done] == [False] * 4
    assert [len(b) for b in backend.batches] == [1, 2, 2]  # hits never take a model place
    assert guard.stats.cache_hits == 1
    await guard.close()


async def test_a_miss_joins_the_generation_of_its_key_under_way() -> None:
    backend, guard = await _started(max_batch_size=4, max_in_flight=2)
    first = await guard.submit(_req("spam spam"))
    await _until(lambda: len(backend.batches) == 1)  # generating now
    second = await guard.submit(_req("spam spam"))
    other = await guard.submit(_req("something else"))
    await _until(lambda: len(backend.batches) == 2)
    backend.gate.set()
    a, b, _ = await asyncio.gather(first, second, other)
    assert backend.batches == [[backend.batches[0][0]], [backend.batches[1][0]]]
    assert "spam spam" in backend.batches[0][0] and "something else" in backend.batches[1][0]
    assert a.verdict == b.verdict and not b.cached
    assert guard.stats.joined == 1 and guard.stats.generated == 2
    # and now it is cached
    again = await guard.moderate(_req("spam spam"))
    assert again.cached
    await guard.close()


async def test_misses_beyond_the_model_window_wait_at_submit() -> None:
    """Backpressure: hits leave at once, so what `submit` bounds is the misses in the guard."""
    backend, guard = await _started(max_batch_size=2, max_in_flight=1)
    window = 2 * 2 * (1 + 1)
    futures = [await guard.submit(_req(f"m{i}")) for i in range(window)]
    blocked = asyncio.create_task(guard.submit(_req("one too many")))
    await asyncio.sleep(0.05)
    assert not blocked.done(), "submit waits while the guard holds its window of misses"
    backend.gate.set()
    await asyncio.gather(*futures)
    extra = await asyncio.wait_for(blocked, 1.0)
    assert not (await extra).cached
    await guard.close()


async def test_close_without_drain_fails_what_waits() -> None:
    backend, guard = await _started(max_batch_size=1, max_in_flight=1)
    futures = [await guard.submit(_req(f"x{i}")) for i in range(4)]
    await _until(lambda: len(backend.batches) == 1)
    await guard.close(drain=False, timeout=1.0)
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(r, Exception) for r in results), results


@pytest.mark.parametrize("cached", [False, True])
async def test_results_come_back_in_any_mix(cached: bool) -> None:
    backend = GatedBackend()
    backend.gate.set()
    cache = MemoryVerdictCache() if cached else None
    guard = Guard(backend, cache=cache, max_batch_size=8, max_wait_ms=1, max_in_flight=2)
    await guard.start()
    texts = [f"t{i % 7}" for i in range(60)]
    results = await asyncio.gather(*(guard.moderate(_req(t)) for t in texts))
    assert all(r.verdict.request == "harmful" for r in results)
    assert len({r.key for r in results}) == 7
    assert sum(len(b) for b in backend.batches) == 7  # one generation per distinct text
    await guard.close()
