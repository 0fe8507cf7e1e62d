"""An asyncio micro-batcher: many callers' single items in, few batched `process` calls out.

Items accumulate into the *current* batch, which starts (is handed to `process`) when it holds
`max_batch_size` distinct items or `max_wait_ms` after its first item arrived, whichever comes
first, and only while fewer than `max_in_flight` batches are being processed. A batch that is
due but has no free slot stays current and keeps growing until a slot frees or it is full; when
it is full and no slot is free, `submit` waits. That wait is the backpressure a consumer relies
on: it stops pulling input while the engine is saturated.

Dedupe: with a `key` function, items with equal keys inside one batch are passed to `process`
once (the first one submitted stands for all) and every caller gets that one result. Without a
`key`, every item is distinct.

Every future a caller gets is resolved, one way or another: a result, the exception `process`
raised, `BatchResultError` when `process` broke its contract, or `BatcherClosed`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from itertools import count
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger("guardstream.batcher")

#: How long `close` waits for cancelled batches to unwind before it returns anyway.
_CANCEL_GRACE_S = 1.0


class BatcherClosed(RuntimeError):
    """The batcher is closed: no new items, and items it could not finish fail with this."""


class BatchResultError(RuntimeError):
    """`process` broke its contract: it must return exactly one result per item, in order."""


FlushHook = Callable[[int, list[float]], None]


@dataclass
class BatcherStats:
    """Counters of one batcher (read them, don't write them)."""

    batches: int = 0  # batches handed to `process`
    items: int = 0  # items submitted (every call, duplicates included)
    processed: int = 0  # distinct items handed to `process`
    deduped: int = 0  # items that joined an equal item already in their batch
    failed_batches: int = 0  # batches whose `process` raised or broke its contract
    in_flight: int = 0  # batches being processed right now
    max_in_flight_seen: int = 0
    pending: int = 0  # distinct items in the current (not yet started) batch
    last_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=32))


@dataclass(eq=False)
class _Entry(Generic[T, R]):
    item: T
    futures: list[asyncio.Future[R]]
    enqueued_at: list[float]


@dataclass(eq=False)
class _Batch(Generic[T, R]):
    entries: dict[Hashable, _Entry[T, R]] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None
    due: bool = False

    def futures(self) -> list[asyncio.Future[R]]:
        return [fut for entry in self.entries.values() for fut in entry.futures]


def _fail(futures: Sequence[asyncio.Future[R]], exc: BaseException) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_exception(exc)


class MicroBatcher(Generic[T, R]):
    """Collects single items into batches for `process` (see the module docstring).

    `process` receives the distinct items of one batch and must return one result per item,
    in the same order. `on_flush(size, waits_ms)` is called as each batch starts: `size` is the
    number of distinct items handed to `process`, `waits_ms` has one entry per submitted item
    (duplicates included) saying how long it waited between `submit` and the batch's start.
    `on_duplicate(first, item)` is called when `item` joins the equal `first` in its batch (so
    the caller can carry what `item` holds over to `first`, e.g. its trace context).
    """

    def __init__(
        self,
        process: Callable[[list[T]], Awaitable[list[R]]],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_in_flight: int,
        key: Callable[[T], Hashable] | None = None,
        name: str = "batcher",
        on_flush: FlushHook | None = None,
        on_duplicate: Callable[[T, T], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self._process = process
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_ms / 1000.0
        self._max_in_flight = max_in_flight
        self._key = key
        self._serial = count()
        self.name = name
        self._on_flush = on_flush
        self._on_duplicate = on_duplicate
        self.stats = BatcherStats()
        self._current: _Batch[T, R] | None = None
        self._running: dict[_Batch[T, R], asyncio.Task[None]] = {}
        self._closed = False
        self._changed = asyncio.Event()  # set (and replaced) whenever a batch starts or ends

    @property
    def closed(self) -> bool:
        return self._closed

    async def submit(self, item: T, future: asyncio.Future[R] | None = None) -> asyncio.Future[R]:
        """Add `item` to the current batch and return its future (`future`, when given: the
        caller's own, which the batcher then settles).

        Waits only while the current batch is full and `max_in_flight` batches are running (an
        item equal to one already in that full batch joins it without waiting). Raises
        `BatcherClosed` once `close` has begun.
        """
        key: Hashable = self._key(item) if self._key is not None else next(self._serial)
        while True:
            fut = self._submit(item, key, future)
            if fut is not None:
                return fut
            await self._wait_change()

    def submit_nowait(
        self, item: T, future: asyncio.Future[R] | None = None
    ) -> asyncio.Future[R] | None:
        """`submit` without the wait: the item's future, or None (and nothing queued) when
        `submit` would have waited. Raises `BatcherClosed` once `close` has begun."""
        key: Hashable = self._key(item) if self._key is not None else next(self._serial)
        return self._submit(item, key, future)

    def _submit(
        self, item: T, key: Hashable, future: asyncio.Future[R] | None
    ) -> asyncio.Future[R] | None:
        if self._closed:
            raise BatcherClosed(f"{self.name} is closed")
        batch = self._current
        if batch is not None and key not in batch.entries:
            if len(batch.entries) >= self._max_batch_size:
                return None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future() if future is None else future
        if batch is None:
            batch = self._current = _Batch()
            batch.timer = loop.call_later(self._max_wait_s, self._on_timer, batch)
        self.stats.items += 1
        entry = batch.entries.get(key)
        if entry is None:
            batch.entries[key] = _Entry(item, [fut], [loop.time()])
            self.stats.pending = len(batch.entries)
        else:
            entry.futures.append(fut)
            entry.enqueued_at.append(loop.time())
            self.stats.deduped += 1
            if self._on_duplicate is not None:
                self._on_duplicate(entry.item, item)
        self._maybe_start()
        return fut

    async def run(self, item: T) -> R:
        """Submit `item` and wait for its result. Cancelling this cancels only this item."""
        fut = await self.submit(item)
        return await fut

    async def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting items and finish.

        `drain=True`: start what is pending (at the usual in-flight bound) and wait for every
        batch; after `timeout` seconds, whatever is unfinished fails with `BatcherClosed` and
        its batches are cancelled. `drain=False`: fail every unresolved future with
        `BatcherClosed` now and cancel the running batches.
        """
        self._closed = True
        self._notify()  # blocked submitters wake up and raise BatcherClosed
        if drain:
            if self._current is not None:
                self._current.due = True
                self._maybe_start()
            try:
                async with asyncio.timeout(timeout):
                    while self._current is not None or self._running:
                        await self._wait_change()
                return
            except TimeoutError:
                logger.warning(
                    "%s: drain timed out after %ss, failing the rest", self.name, timeout
                )
        await self._abort()

    async def _abort(self) -> None:
        error = BatcherClosed(f"{self.name} closed before this item was processed")
        batch, self._current = self._current, None
        if batch is not None:
            if batch.timer is not None:
                batch.timer.cancel()
            _fail(batch.futures(), error)
            self.stats.pending = 0
        tasks = list(self._running.values())
        for running, task in self._running.items():
            _fail(running.futures(), error)
            task.cancel()
        self._notify()
        if tasks:
            _done, stuck = await asyncio.wait(tasks, timeout=_CANCEL_GRACE_S)
            if stuck:
                logger.warning("%s: %d batches ignored cancellation", self.name, len(stuck))

    async def _wait_change(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _on_timer(self, batch: _Batch[T, R]) -> None:
        batch.timer = None
        if batch is self._current:
            batch.due = True
            self._maybe_start()

    def _maybe_start(self) -> None:
        batch = self._current
        if batch is None or len(self._running) >= self._max_in_flight:
            return
        if not batch.due and len(batch.entries) < self._max_batch_size:
            return
        self._current = None
        self.stats.pending = 0
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        # Items whose every caller has cancelled are not worth processing.
        for key in [k for k, e in batch.entries.items() if all(f.done() for f in e.futures)]:
            del batch.entries[key]
        if batch.entries:
            self._start(batch)
        self._notify()

    def _start(self, batch: _Batch[T, R]) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        size = len(batch.entries)
        self.stats.batches += 1
        self.stats.processed += size
        self.stats.last_sizes.append(size)
        task = loop.create_task(self._run_batch(batch), name=f"{self.name}-batch")
        self._running[batch] = task
        task.add_done_callback(lambda _task: self._finish(batch))
        self.stats.in_flight = len(self._running)
        self.stats.max_in_flight_seen = max(self.stats.max_in_flight_seen, self.stats.in_flight)
        if self._on_flush is not None:
            waits = [(now - t) * 1000.0 for e in batch.entries.values() for t in e.enqueued_at]
            try:
                self._on_flush(size, waits)
            except Exception:
                logger.exception("%s: on_flush hook failed", self.name)

    async def _run_batch(self, batch: _Batch[T, R]) -> None:
        entries = list(batch.entries.values())
        try:
            results = await self._process([e.item for e in entries])
            if not isinstance(results, Sequence) or len(results) != len(entries):
                got = len(results) if isinstance(results, Sequence) else type(results).__name__
                raise BatchResultError(
                    f"{self.name}: process returned {got} results for {len(entries)} items"
                )
            for entry, result in zip(entries, results, strict=True):
                for fut in entry.futures:
                    if not fut.done():
                        fut.set_result(result)
        except asyncio.CancelledError:
            _fail(batch.futures(), BatcherClosed(f"{self.name}: batch cancelled"))
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every caller of this batch
            self.stats.failed_batches += 1
            _fail(batch.futures(), exc)

    def _finish(self, batch: _Batch[T, R]) -> None:
        """Done callback of a batch's task: runs however the task ended, even cancelled before
        it started, so no future of the batch can hang and its slot is always released."""
        _fail(batch.futures(), BatchResultError(f"{self.name}: batch aborted"))
        self._running.pop(batch, None)
        self.stats.in_flight = len(self._running)
        self._maybe_start()
        self._notify()
