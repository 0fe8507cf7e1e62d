"""In-order publishing per input partition, with commit only after the broker's acknowledgement.

Each input partition has a `Lane`: a queue of consumed events in offset order, each with the
records it must produce (ready at once for a dead letter, later for a verdict). The lane takes the
longest run of ready events at its head, produces all their records, awaits the broker's
acknowledgement of every one, and only then acks the events, in offset order (so Faust commits
only offsets whose output is durable, and never past a gap).

A failed produce is retried (`PUBLISH_RETRY`: exponential backoff with jitter) while the error
can go away (a broker outage, a leader change); nothing is acked meanwhile, so nothing is lost.
An error that retrying cannot mend (authorization, a record too large, an invalid topic) stops
the lane at once: its events stay unacked (re-read after a restart), `failed` says why, and the
worker's readiness fails. A lane whose produce has kept failing for `stall_after_s` is `stalled`
(readiness fails too, with the reason) and goes on retrying. A lane whose task dies for any
other reason is failed the same way: a partition never stalls silently.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import errors as kafka_errors
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential_jitter,
)

from service.messages import Outgoing

log = logging.getLogger("guardstream.lanes")

Send = Callable[[Outgoing], Awaitable[Awaitable[Any]]]
Ack = Callable[[Any], Awaitable[Any]]
Convert = Callable[[Any], list[Outgoing]]
OnFailure = Callable[[BaseException], list[Outgoing]]
#: Exactly-once publishing (`service.eos`): writes the records, commits the events' offset in the
#: same transaction, then acks the events with the given `Ack`.
Transact = Callable[[list[Outgoing], list[Any], Ack], Awaitable[None]]

#: Produce errors that no retry can mend: the lane stops and says so.
FATAL_PRODUCE_ERRORS: tuple[type[BaseException], ...] = (
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.ClusterAuthorizationFailedError,
    kafka_errors.TransactionalIdAuthorizationFailed,
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.InvalidTopicError,
    kafka_errors.UnsupportedForMessageFormatError,
    kafka_errors.ProducerFenced,
)


def retriable(exc: BaseException) -> bool:
    return not isinstance(exc, (*FATAL_PRODUCE_ERRORS, asyncio.CancelledError))


def publish_retry(on_retry: Callable[[RetryCallState], None]) -> AsyncRetrying:
    """The one retry policy of publishing (plain produce and transactions): retriable errors
    only, forever, 0.1 s doubling to 5 s with up to 0.1 s of jitter."""
    return AsyncRetrying(
        retry=retry_if_exception(retriable),
        wait=wait_exponential_jitter(multiplier=0.1, max=5.0, jitter=0.1),
        before_sleep=on_retry,
        reraise=True,
    )


class LaneStopped(Exception):
    """The lane was stopped before this event's output was published (it will be re-read)."""


@dataclass(slots=True)
class Item:
    event: Any
    ready: list[Outgoing] | None = None
    future: asyncio.Future[Any] | None = None
    convert: Convert | None = None
    on_failure: OnFailure | None = None
    on_done: Callable[[], None] | None = None  # after the broker took its records and the ack
    release: Callable[[], None] | None = None  # when the lane is done with it, either way
    #: Its future waits for a prompt (by event time): given up at a rebalance, not waited for.
    waits_prompt: bool = False

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def outgoing(self) -> list[Outgoing]:
        if self.future is None:
            return self.ready or []
        exc = self.future.exception()
        if exc is not None:
            if self.on_failure is None:
                raise exc
            return self.on_failure(exc)
        assert self.convert is not None
        return self.convert(self.future.result())


class Lane:
    def __init__(
        self,
        name: str,
        send: Send,
        ack: Ack,
        *,
        max_run: int = 512,
        fatal: tuple[type[BaseException], ...] = (),
        transact: Transact | None = None,
        stall_after_s: float = 60.0,
    ) -> None:
        self.name = name
        self._send = send
        self._ack = ack
        self._transact = transact
        self._max_run = max_run
        self._fatal = fatal
        self._stall_after_s = stall_after_s
        self._items: deque[Item] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._sealed = False
        self._failing_since: float | None = None
        self.failed: str | None = None  # the lane stopped for good: why
        self.stalled: str | None = None  # the lane's produce keeps failing: why
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"lane:{name}")
        self._task.add_done_callback(self._on_task_done)
        self.published = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def healthy(self) -> bool:
        return self.failed is None and self.stalled is None

    def put(self, item: Item) -> bool:
        """Queue `item`; False when the lane was sealed (events were handed back: nothing after
        them may be published before they are, so the caller hands this one back too)."""
        if self._sealed:
            return False
        if self._closing:
            raise LaneStopped(f"lane {self.name} is closing")
        self._items.append(item)
        self._idle.clear()
        self._wake.set()
        return True

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def give_up_waiting(self) -> list[Item]:
        """Take out the first item that waits for its prompt and every item behind it (none of
        them can be published before it); the lane goes on with the items before it, and is
        sealed: it takes no later item (one an agent was still working on), whose publishing
        would commit past the items taken out."""
        for i, item in enumerate(self._items):
            if item.waits_prompt and not item.done():
                taken = [self._items[j] for j in range(i, len(self._items))]
                for _ in taken:
                    self._items.pop()
                self._sealed = True
                if not self._items:
                    self._idle.set()
                self._wake.set()
                return taken
        return []

    def take_all(self) -> list[Item]:
        """Take out every item (a failed lane, at a rebalance or shutdown)."""
        taken = list(self._items)
        self._items.clear()
        self._sealed = True
        self._idle.set()
        self._wake.set()
        return taken

    async def close(self, timeout: float | None = None) -> bool:
        """Publish what can be published within `timeout`; True when the lane emptied."""
        self._closing = True
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._task)
        except TimeoutError:
            self._task.cancel()
            try:
                await self._task
            except BaseException:  # noqa: BLE001, S110 - cancelled on purpose; logged if not
                pass
            return False
        except Exception:  # noqa: BLE001 - the run loop already logged why it stopped
            return False
        return not self._items

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self.failed is None:
            self.failed = f"{type(exc).__name__}: {exc}"
            log.error(
                "lane %s died (%s): its partition is stalled until the worker restarts",
                self.name,
                self.failed,
                exc_info=exc,
            )

    async def _run(self) -> None:
        while True:
            if not self._items:
                self._idle.set()
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            head = self._items[0]
            if head.future is not None and not head.future.done():
                await asyncio.wait([head.future])
                continue  # the head may have been taken out meanwhile (a rebalance)
            run: list[Item] = []
            while self._items and len(run) < self._max_run and self._items[0].done():
                run.append(self._items.popleft())
            try:
                records = [rec for item in run for rec in item.outgoing()]
            except self._fatal as exc:
                # e.g. the engine was closed under us at shutdown: leave these unacked.
                log.warning("lane %s stops before publishing: %s", self.name, exc)
                self._items.extendleft(reversed(run))
                self._closing = True
                self._idle.set()
                return
            try:
                await self._deliver(records, run)
            except FATAL_PRODUCE_ERRORS as exc:
                self._items.extendleft(reversed(run))
                self.failed = f"{type(exc).__name__}: {exc}"
                topics = sorted({rec.topic for rec in records})
                log.error(
                    "lane %s stopped: producing to %s failed with an error that retrying "
                    "cannot mend (%s); its %d events stay unacknowledged and are read again "
                    "after a restart",
                    self.name,
                    ", ".join(topics),
                    self.failed,
                    len(self._items),
                )
                self._closing = True
                self._idle.set()
                return
            for item in run:
                if item.on_done is not None:
                    item.on_done()
                if item.release is not None:
                    item.release()
            self.published += len(records)

    async def _deliver(self, records: list[Outgoing], run: list[Item]) -> None:
        events = [item.event for item in run]
        async for attempt in publish_retry(self._on_retry):
            with attempt:
                if self._transact is not None:
                    await self._transact(records, events, self._ack)
                else:
                    pending = [await self._send(rec) for rec in records]
                    await asyncio.gather(*pending)
        if self._transact is None:
            for event in events:
                await self._ack(event)
        if self.stalled is not None:
            log.warning("lane %s publishes again", self.name)
        self._failing_since = None
        self.stalled = None

    def _on_retry(self, state: RetryCallState) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        exc = state.outcome.exception() if state.outcome is not None else None
        reason = f"{type(exc).__name__}: {exc}"
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        if now - self._failing_since >= self._stall_after_s:
            if self.stalled is None:
                log.error(
                    "lane %s stalled: produce failing for %.0fs (%s); readiness fails until it "
                    "succeeds",
                    self.name,
                    now - self._failing_since,
                    reason,
                )
            self.stalled = reason
        else:
            log.warning(
                "lane %s: produce failed (%s); retrying in %.1fs", self.name, reason, delay
            )
