"""MicroBatcher: flushing, dedupe, ordering, the in-flight bound, failures, cancellation, close."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.batcher import BatcherClosed, BatchResultError, MicroBatcher

# Every test body runs under this bound: a hang fails the test instead of stalling the suite.
HANG_S = 10.0


class Recorder:
    """A `process` that records its batches and its concurrency; can be held at a gate."""

    def __init__(self, *, gated: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.active = 0
        self.max_active = 0
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        if not gated:
            self.gate.set()

    async def __call__(self, items: list[int]) -> list[str]:
        self.batches.append(list(items))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.started.set()
        try:
            await self.gate.wait()
            await asyncio.sleep(0)
            return [f"r{i}" for i in items]
        finally:
            self.active -= 1


async def test_flush_by_size_before_the_timer() -> None:
    rec = Recorder()
    b: MicroBatcher[int, str] = MicroBatcher(
        rec, max_batch_size=3, max_wait_ms=60_000, max_in_flight=2
    )
    async with asyncio.timeout(HANG_S):
        results = await asyncio.gather(*(b.run(i) for i in range(6)))
    assert results == [f"r{i}" for i in range(6)]
    assert rec.batches == [[0, 1, 2], [3, 4, 5]]
    assert b.stats.batches == 2 and list(b.stats.last_sizes) == [3, 3]
    await b.close()


async def test_a_lone_item_flushes_after_max_wait() -> None:
    rec = Recorder()
    b: MicroBatcher[int, str] = MicroBatcher(
        rec, max_batch_size=100, max_wait_ms=20, max_in_flight=1
    )
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with asyncio.timeout(HANG_S):
        assert await b.run(7) == "r7"
    elapsed = loop.time() - t0
    assert elapsed >= 0.015  # it did wait for company (timers may fire a little early)
    assert elapsed < 0.02 + 3.0  # and not forever: generous margin for a loaded machine
    assert rec.batches == [[7]]
    await b.close()


async def test_dedupe_processes_equal_keys_once() -> None:
    rec = Recorder()
    flushes: list[tuple[int, int]] = []
    b: MicroBatcher[int, str] = MicroBatcher(
        rec,
        max_batch_size=10,
        max_wait_ms=10,
        max_in_flight=1,
        key=lambda i: i % 3,
        on_flush=lambda size, waits: flushes.append((size, len(waits))),
    )
    async with asyncio.timeout(HANG_S):
        results = await asyncio.gather(*(b.run(i) for i in [1, 4, 2, 7, 5, 3]))
    # 1, 4, 7 share key 1 -> all get 1's result; 2, 5 share key 2; 3 is alone.
    assert results == ["r1", "r1", "r2", "r1", "r2", "r3"]
    assert rec.batches == [[1, 2, 3]]
    assert b.stats.deduped == 3 and b.stats.items == 6 and b.stats.processed == 3
    assert flushes == [(3, 6)]
    await b.close()


async def test_results_keep_submission_order_within_a_batch() -> None:
    async def reverse_aware(items: list[int]) -> list[int]:
        await asyncio.sleep(0)
        return [i * 10 for i in items]

    b: MicroBatcher[int, int] = MicroBatcher(
        reverse_aware, max_batch_size=50, max_wait_ms=5, max_in_flight=2
    )
    order = [9, 3, 27, 1, 14, 0, 5]
    async with asyncio.timeout(HANG_S):
        futs = [await b.submit(i) for i in order]
        assert [await f for f in futs] == [i * 10 for i in order]
    await b.close()


async def test_in_flight_bound_and_backpressure() -> None:
    rec = Recorder(gated=True)
    b: MicroBatcher[int, str] = MicroBatcher(
        rec, max_batch_size=2, max_wait_ms=60_000, max_in_flight=2
    )
    async with asyncio.timeout(HANG_S):
        futs = [await b.submit(i) for i in range(6)]  # 2 batches running, the 3rd one full
        assert b.stats.in_flight == 2
        await asyncio.sleep(0)
        assert rec.batches == [[0, 1], [2, 3]]
        blocked = asyncio.create_task(b.submit(6))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not blocked.done()  # submit waits: engine full and the current batch full
        assert b.stats.pending == 2
        rec.gate.set()
        fut6 = await blocked  # a slot freed, batch [4, 5] started, 6 opened a new batch
        assert b.stats.pending == 1
        await b.close(drain=True)  # flushes [6] without waiting for its (long) timer
        results = await asyncio.gather(*futs, fut6)
    assert results == [f"r{i}" for i in range(7)]
    assert rec.batches == [[0, 1], [2, 3], [4, 5], [6]]
    assert rec.max_active <= 2 and b.stats.max_in_flight_seen == 2


async def test_a_duplicate_joins_a_full_batch_without_waiting() -> None:
    rec = Recorder(gated=True)
    b: MicroBatcher[int, str] = MicroBatcher(
        rec, max_batch_size=2, max_wait_ms=60_000, max_in_flight=1, key=lambda i: i
    )
    async with asyncio.timeout(HANG_S):
        futs = [await b.submit(i) for i in range(4)]  # [0, 1] running, [2, 3] full, waiting
        duplicate = asyncio.create_task(b.submit(3))
        newcomer = asyncio.create_task(b.submit(4))
        for _ in range(20):
            await asyncio.sleep(0)
        assert duplicate.done() and not newcomer.done()
        rec.gate.set()
        futs += [await duplicate, await newcomer]
        await b.close()
        assert list(await asyncio.gather(*futs)) == ["r0", "r1", "r2", "r3", "r3", "r4"]
    assert rec.batches == [[0, 1], [2, 3], [4]]


async def test_due_batch_grows_while_waiting_for_a_slot() -> None:
    rec = Recorder(gated=True)
    b: MicroBatcher[int, str] = MicroBatcher(rec, max_batch_size=10, max_wait_ms=1, max_in_flight=1)
    async with asyncio.timeout(HANG_S):
        first = await b.submit(0)
        await rec.started.wait()
        futs = [await b.submit(i) for i in (1, 2)]
        await asyncio.sleep(0.05)  # the timer of [1, 2] fires, but no slot is free
        futs.append(await b.submit(3))  # so it keeps collecting
        rec.gate.set()
        await asyncio.gather(first, *futs)
    assert rec.batches == [[0], [1, 2, 3]]
    await b.close()


async def test_process_exception_reaches_every_caller() -> None:
    async def boom(items: list[int]) -> list[int]:
        raise ValueError("backend on fire")

    b: MicroBatcher[int, int] = MicroBatcher(boom, max_batch_size=3, max_wait_ms=5, max_in_flight=1)
    async with asyncio.timeout(HANG_S):
        results = await asyncio.gather(*(b.run(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ValueError) and "on fire" in str(r) for r in results)
    assert b.stats.failed_batches == 1
    await b.close()


async def test_wrong_result_count_is_a_clear_error() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    b: MicroBatcher[int, int] = MicroBatcher(
        short, max_batch_size=3, max_wait_ms=5, max_in_flight=1
    )
    async with asyncio.timeout(HANG_S):
        results = await asyncio.gather(*(b.run(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, BatchResultError) for r in results)
    assert "2 results for 3 items" in str(results[0])
    await b.close()


async def test_cancelling_one_waiter_leaves_the_others() -> None:
    rec = Recorder(gated=True)
    b: MicroBatcher[int, str] = MicroBatcher(
        rec, max_batch_size=3, max_wait_ms=60_000, max_in_flight=1, key=lambda i: i
    )
    async with asyncio.timeout(HANG_S):
        a = asyncio.create_task(b.run(1))
        twin = asyncio.create_task(b.run(1))  # same key as `a`
        c = asyncio.create_task(b.run(2))
        d = asyncio.create_task(b.run(3))
        await rec.started.wait()
        a.cancel()
        await asyncio.sleep(0)
        rec.gate.set()
        assert await twin == "r1" and await c == "r2" and await d == "r3"
        with pytest.raises(asyncio.CancelledError):
            await a
    assert rec.batches == [[1, 2, 3]] and b.stats.failed_batches == 0
    await b.close()


async def test_an_item_everyone_cancelled_is_not_processed() -> None:
    rec = Recorder()
    b: MicroBatcher[int, str] = MicroBatcher(
        rec, max_batch_size=10, max_wait_ms=20, max_in_flight=1
    )
    async with asyncio.timeout(HANG_S):
        gone = await b.submit(1)
        kept = await b.submit(2)
        gone.cancel()
        assert await kept == "r2"
    assert rec.batches == [[2]]
    await b.close()


async def test_close_drain_flushes_pending_and_waits() -> None:
    rec = Recorder()
    b: MicroBatcher[int, str] = MicroBatcher(
        rec, max_batch_size=10, max_wait_ms=60_000, max_in_flight=1
    )
    async with asyncio.timeout(HANG_S):
        futs = [await b.submit(i) for i in range(3)]
        await b.close(drain=True)
        assert all(f.done() for f in futs)
        assert [f.result() for f in futs] == ["r0", "r1", "r2"]
        with pytest.raises(BatcherClosed):
            await b.submit(9)


async def test_close_drain_timeout_fails_the_rest() -> None:
    rec = Recorder(gated=True)  # never released: process hangs
    b: MicroBatcher[int, str] = MicroBatcher(rec, max_batch_size=1, max_wait_ms=0, max_in_flight=1)
    async with asyncio.timeout(HANG_S):
        running = await b.submit(1)
        await rec.started.wait()
        queued = await b.submit(2)
        await b.close(drain=True, timeout=0.05)
        for fut in (running, queued):
            with pytest.raises(BatcherClosed):
                await fut
    assert b.stats.in_flight == 0


async def test_close_without_drain_fails_everything_at_once() -> None:
    rec = Recorder(gated=True)
    b: MicroBatcher[int, str] = MicroBatcher(
        rec, max_batch_size=2, max_wait_ms=60_000, max_in_flight=1
    )
    async with asyncio.timeout(HANG_S):
        futs = [await b.submit(i) for i in range(4)]  # [0, 1] running, [2, 3] full and waiting
        blocked = asyncio.create_task(b.submit(4))
        await rec.started.wait()
        await b.close(drain=False)
        for fut in futs:
            with pytest.raises(BatcherClosed):
                await fut
        with pytest.raises(BatcherClosed):
            await blocked
    assert rec.batches == [[0, 1]]


async def test_on_flush_reports_waits_and_a_broken_hook_is_harmless() -> None:
    seen: list[tuple[int, list[float]]] = []

    def hook(size: int, waits: list[float]) -> None:
        seen.append((size, waits))
        raise RuntimeError("telemetry bug")

    b: MicroBatcher[int, str] = MicroBatcher(
        Recorder(), max_batch_size=5, max_wait_ms=30, max_in_flight=1, on_flush=hook
    )
    async with asyncio.timeout(HANG_S):
        assert list(await asyncio.gather(b.run(1), b.run(2))) == ["r1", "r2"]
    [(size, waits)] = seen
    assert size == 2 and len(waits) == 2
    assert all(w >= 20 for w in waits)  # both waited for the timer (>= 30 ms, minus jitter)
    await b.close()


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(Recorder(), max_batch_size=0, max_wait_ms=1, max_in_flight=1)
    with pytest.raises(ValueError, match="max_in_flight"):
        MicroBatcher(Recorder(), max_batch_size=1, max_wait_ms=1, max_in_flight=0)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    max_batch_size=st.integers(1, 6),
    max_in_flight=st.integers(1, 3),
    max_wait_ms=st.sampled_from([0.0, 0.5, 2.0]),
    plan=st.lists(
        st.tuples(st.integers(0, 7), st.sampled_from([0, 0, 0, 1, 2])), min_size=1, max_size=40
    ),
)
def test_every_item_gets_its_own_result(
    max_batch_size: int,
    max_in_flight: int,
    max_wait_ms: float,
    plan: list[tuple[int, int]],
) -> None:
    """Random arrivals (values with repeats, pauses between submits): each caller gets the
    result for its own value, batches hold distinct values, the in-flight bound holds."""

    async def scenario() -> None:
        active = 0
        peak = 0
        batches: list[list[int]] = []

        async def process(items: list[int]) -> list[int]:
            nonlocal active, peak
            batches.append(items)
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.001 * (len(items) % 3))
            active -= 1
            return [-v for v in items]

        b: MicroBatcher[int, int] = MicroBatcher(
            process,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_in_flight=max_in_flight,
            key=lambda v: v,
        )
        async with asyncio.timeout(HANG_S):
            futs: list[tuple[int, asyncio.Future[int]]] = []
            for value, pause in plan:
                futs.append((value, await b.submit(value)))
                for _ in range(pause):
                    await asyncio.sleep(0.001)
            for value, fut in futs:
                assert await fut == -value
            await b.close()
        assert peak <= max_in_flight
        assert all(len(batch) == len(set(batch)) <= max_batch_size for batch in batches)
        assert b.stats.items == len(plan)

    asyncio.run(scenario())
