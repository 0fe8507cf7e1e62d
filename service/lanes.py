"""In-order publishing per input partition, with commit only after the broker's acknowledgement.

Each input partition has a `Lane`: a queue of consumed events in offset order, each with the
records it must produce (ready at once for a dead letter, later for a verdict). The lane takes the
longest run of ready events at its head, produces all their records, awaits the broker's
acknowledgement of every one, and only then acks the events, in offset order (so Faust commits
only offsets whose output is durable, and never past a gap). A failed produce is retried with
backoff: nothing is acked, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from service.messages import Outgoing

log = logging.getLogger("guardstream.lanes")

Send = Callable[[Outgoing], Awaitable[Awaitable[Any]]]
Ack = Callable[[Any], Awaitable[Any]]
Convert = Callable[[Any], list[Outgoing]]
OnFailure = Callable[[BaseException], list[Outgoing]]
#: Exactly-once publishing (`service.eos`): writes the records, commits the events' offset in the
#: same transaction, then acks the events with the given `Ack`.
Transact = Callable[[list[Outgoing], list[Any], Ack], Awaitable[None]]


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
    ) -> None:
        self.name = name
        self._send = send
        self._ack = ack
        self._transact = transact
        self._max_run = max_run
        self._fatal = fatal
        self._items: deque[Item] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"lane:{name}")
        self.published = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Item) -> None:
        if self._closing:
            raise LaneStopped(f"lane {self.name} is closing")
        self._items.append(item)
        self._idle.clear()
        self._wake.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def close(self, timeout: float | None = None) -> bool:
        """Publish what can be published within `timeout`; True when the lane emptied."""
        self._closing = True
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._task)
        except TimeoutError:
            self._task.cancel()
            return False
        except Exception:  # noqa: BLE001 - the run loop already logged why it stopped
            return False
        return not self._items

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
            if self._transact is not None:
                await self._transact(records, [item.event for item in run], self._ack)
            else:
                await self._publish(records)
            for item in run:
                if self._transact is None:
                    await self._ack(item.event)
                if item.on_done is not None:
                    item.on_done()
            self.published += len(records)

    async def _publish(self, records: list[Outgoing]) -> None:
        delay = 0.1
        while True:
            try:
                pending = [await self._send(rec) for rec in records]
                await asyncio.gather(*pending)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried until the broker takes them
                log.warning(
                    "lane %s: produce of %d records failed (%s); retrying in %.1fs",
                    self.name,
                    len(records),
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
