"""Recent prompts, so that a response can be paired with its prompt by `reply_to`, by event time.

The store is a Faust table (changelog-backed: a worker that takes over a partition recovers it
before it consumes) written through `PromptStore`, which bounds it by age and size. Entries are
keyed by tenant, conversation and prompt id (`prompt_key`): message ids are the producer's, not
global, so one tenant's response never pairs with another tenant's prompt.

A response whose prompt is not in the table waits for it by event time, as a stream-table join
with a grace period does: each prompts partition has a watermark, the time its prompts stream has
reached (the largest prompt timestamp consumed there, or the wall clock while the partition is
read to its end). The response is moderated without its prompt only when every prompts partition
its prompt can be in (of those this worker holds) has passed the response's timestamp plus the
grace, or when a generous wall-clock bound has passed. While a partition is being recovered or
rebalanced, or is behind the response's time (a catch-up backlog), its watermark does not move,
so the response keeps waiting. At a rebalance the waiting responses are given up unpublished
(`service.pipeline`) and read again by whoever owns them next; the watermarks start afresh.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable, Collection, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from service.messages import Outgoing

Changelog = Callable[[int, str, dict[str, Any] | None], None]
#: (partition, key, value) -> the changelog record, in the table's own key and value formats.
ChangelogRecord = Callable[[int, str, dict[str, Any]], Outgoing]

_SEP = "\x1f"


def prompt_key(tenant: str | None, conversation_id: str, prompt_id: str) -> str:
    """The table key of a prompt: tenant (empty when none), conversation id and message id."""
    return _SEP.join((tenant or "", conversation_id, prompt_id))


@dataclass(eq=False)
class _Waiter:
    key: str
    due: float  # the response's timestamp plus the grace (epoch seconds)
    partitions: frozenset[int]
    future: asyncio.Future[str | None] = field(repr=False)


class PromptStore:
    def __init__(
        self,
        data: MutableMapping[str, Any],
        changelog: Changelog,
        *,
        ttl_s: float,
        max_entries: int,
        grace_s: float = 5.0,
        max_wait_s: float = 120.0,
        clock: Callable[[], float] = time.time,
        changelog_record: ChangelogRecord | None = None,
    ) -> None:
        self._data = data
        self._changelog = changelog
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.grace_s = grace_s
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._changelog_record = changelog_record
        self._waiters: dict[str, list[_Waiter]] = {}
        self._due: dict[int, list[tuple[float, int, _Waiter]]] = {}  # heaps, per partition
        self._seq = itertools.count()
        self.watermarks: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self._data)

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    # --- prompts -----------------------------------------------------------------------------

    def put(
        self, key: str, text: str, partition: int, ts: float | None = None
    ) -> Outgoing | None:
        """Store a prompt read from `partition` (its Kafka timestamp `ts`, epoch seconds), wake
        the responses waiting for it, and move the partition's watermark to `ts`.

        With `changelog_record`, the changelog record is returned for the caller to publish
        with the prompt's own output (the lane writes it before the prompt's offset is
        committed, in the same transaction under exactly_once); else it goes to `changelog`."""
        value = {"text": text, "ts": self._clock(), "p": partition}
        self._data[key] = value
        record = None
        if self._changelog_record is not None:
            record = self._changelog_record(partition, key, value)
        else:
            self._changelog(partition, key, value)
        for waiter in self._waiters.pop(key, []):
            if not waiter.future.done():
                waiter.future.set_result(text)
        if len(self._data) > self.max_entries:
            self.sweep()
        if ts is not None:
            self.advance(partition, ts)
        return record

    def get(self, key: str) -> str | None:
        value = self._data.get(key)
        if not isinstance(value, dict) or "text" not in value:
            return None
        if self._clock() - float(value.get("ts", 0)) > self.ttl_s:
            return None
        return str(value["text"])

    # --- event time --------------------------------------------------------------------------

    def advance(self, partition: int, ts: float) -> None:
        """The prompts stream of `partition` has reached `ts`: release the responses it passed."""
        if ts <= self.watermarks.get(partition, float("-inf")):
            return
        self.watermarks[partition] = ts
        heap = self._due.get(partition)
        while heap and heap[0][0] <= ts:
            _, _, waiter = heapq.heappop(heap)
            if not waiter.future.done() and self._passed(waiter):
                waiter.future.set_result(None)

    def reset(self) -> None:
        """Forget the watermarks (partitions were revoked; the next owner starts afresh)."""
        self.watermarks.clear()
        self._due = {
            p: [e for e in heap if not e[2].future.done()] for p, heap in self._due.items()
        }
        for heap in self._due.values():
            heapq.heapify(heap)

    def _passed(self, waiter: _Waiter) -> bool:
        marks = self.watermarks
        return all(marks.get(p, float("-inf")) >= waiter.due for p in waiter.partitions)

    async def wait_for(
        self, key: str, ts: float, partitions: Collection[int]
    ) -> tuple[str | None, str]:
        """The prompt's text, waiting by event time for it; None if it does not come.

        `ts` is the response's timestamp, `partitions` the prompts partitions the prompt can be
        in. Returns `(text, how)`: how is `table` (it was there), `waited` (it came), `passed`
        (the prompts stream passed `ts` plus the grace without it) or `timeout` (the wall-clock
        bound `max_wait_s` ran out first).
        """
        text = self.get(key)
        if text is not None:
            return text, "table"
        waiter = _Waiter(
            key,
            ts + self.grace_s,
            frozenset(partitions),
            asyncio.get_running_loop().create_future(),
        )
        if self._passed(waiter):
            return None, "passed"
        self._waiters.setdefault(key, []).append(waiter)
        for p in waiter.partitions:
            heapq.heappush(self._due.setdefault(p, []), (waiter.due, next(self._seq), waiter))
        try:
            async with asyncio.timeout(self.max_wait_s):
                text = await waiter.future
        except TimeoutError:
            return None, "timeout"
        finally:
            self._forget(waiter)
        return (text, "waited") if text is not None else (None, "passed")

    def _forget(self, waiter: _Waiter) -> None:
        waiters = self._waiters.get(waiter.key)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._waiters[waiter.key]
        # Its heap entries are dropped lazily: a done future is skipped when popped.

    # --- bounds ------------------------------------------------------------------------------

    def sweep(self) -> int:
        """Drop entries older than the TTL; then, when more than `max_entries` are left, the
        oldest, down to nine tenths of it: a full table is swept once per tenth of its size, not
        on every put (a full scan and sort of the table each time)."""
        now = self._clock()
        doomed = {
            k
            for k, v in list(self._data.items())
            if not isinstance(v, dict) or now - float(v.get("ts", 0)) > self.ttl_s
        }
        left = len(self._data) - len(doomed)
        if left > self.max_entries:
            target = self.max_entries - self.max_entries // 10
            alive = sorted(
                (float(v["ts"]), k) for k, v in list(self._data.items()) if k not in doomed
            )
            doomed.update(k for _, k in alive[: left - target])
        for key in doomed:
            value = self._data.pop(key, None)
            partition = value.get("p") if isinstance(value, dict) else None
            if isinstance(partition, int):
                self._changelog(partition, key, None)
        return len(doomed)
