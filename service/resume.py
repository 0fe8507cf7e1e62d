"""Input partitions are fetched again only once a rebalance is over and they were seeked.

Faust (faust-streaming 0.15) pauses and resumes partitions only in its own bookkeeping (the set
of "active" partitions it asks aiokafka for); aiokafka itself goes on prefetching every assigned
partition, and a record aiokafka hands back is consumed there (its position moves past it)
whether Faust then keeps it or not. Around a rebalance Faust drops such records in several
places and relies on the seek to the committed offsets at the end of the rebalance to read them
again. A record it drops *after* that seek is never read again, and the next one read looks like
it follows a gap in the log (a compacted or transaction-marker gap), which Faust counts as acked:
its next commit goes past events that no agent ever saw. Seen as:

- records fetched between Faust's resumption of the input partitions and the seek, dropped by
  its topic conductor while the app was still rebalancing (runs of 37-471 events of 3,000 never
  moderated after a graceful restart; a trace: records 362-449 fetched during the seek, a "gap"
  363-449 added the moment it ended);
- records aiokafka returned for an input partition that Faust did not count as active at that
  instant (an empty active set is sent to aiokafka as "no filter": everything prefetched comes
  back), dropped by Faust's fetch loop right after the seek (a scale-out trace: a new worker
  sought responses/1 to 33, and the first record it read was 243; 210 responses never
  moderated).

`ResumeGuard` also hands aiokafka a live view of Faust's active partitions that is never empty
to it: with every partition paused in Faust (during a recovery) aiokafka returns nothing, not
everything it prefetched (a changelog record returned then and dropped by Faust is never read
again: the likely cause of a worker whose recovery never finished after a failover, seen once in
about twenty scale-out runs, "rebalancing" for good). And it pauses the input topics' partitions
in aiokafka itself, in the consumer's thread, the moment a new assignment is set (before Faust
hears of it), so that aiokafka returns none of their records; and resumes them there when Faust
ends the rebalance (`on_rebalance_end`, after the seek and after Faust counts them as active
again): the first record read of each is the one at its committed offset. aiokafka's own pause
neither fetches nor consumes a paused partition's records, whatever Faust asks for.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Iterator
from typing import Any

log = logging.getLogger("guardstream.resume")


class ActiveView:
    """Faust's set of active partitions as aiokafka's `fetched_records(partitions)` reads it:
    membership is the live set's, and it is never falsy (aiokafka takes an empty collection as
    "every partition")."""

    __slots__ = ("_tps",)

    def __init__(self, tps: Collection[Any]) -> None:
        self._tps = tps

    def __bool__(self) -> bool:
        return True

    def __contains__(self, tp: object) -> bool:
        return tp in self._tps

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._tps))

    def __len__(self) -> int:
        return len(self._tps)


class ResumeGuard:
    def __init__(self, topics: Iterable[str]) -> None:
        self._topics = frozenset(topics)
        self._thread: Any = None
        self._paused: frozenset[Any] = frozenset()
        self._epoch = 0  # one per assignment aiokafka made (read across threads: an int)
        self.paused = 0  # assignments whose input partitions were paused
        self.resumed = 0  # of those, resumed at the end of their rebalance

    def install(self, consumer: Any) -> None:
        """Hook Faust's aiokafka consumer thread (faust-streaming 0.15): its rebalance listener
        (`_rebalance_listener`, whose `on_partitions_assigned` aiokafka awaits in the consumer's
        thread once the new assignment is set) and its `_fetch_records`."""
        thread = consumer._thread
        fetch = thread._fetch_records

        async def _fetch_records(kafka: Any, active: Any, *args: Any, **kwargs: Any) -> Any:
            view = ActiveView(active) if active is not None else None
            return await fetch(kafka, view, *args, **kwargs)

        thread._fetch_records = _fetch_records
        listener = thread._rebalance_listener
        real = listener.on_partitions_assigned
        self._thread = thread

        async def on_partitions_assigned(assigned: Iterable[Any]) -> None:
            assigned = list(assigned)
            self.on_assigned(thread._ensure_consumer(), assigned)
            await real(assigned)

        listener.on_partitions_assigned = on_partitions_assigned

    def on_assigned(self, kafka: Any, assigned: Iterable[Any]) -> None:
        """In the consumer's thread: pause the input partitions of a new assignment in aiokafka
        (`AIOKafkaConsumer.pause`)."""
        inputs = frozenset(tp for tp in assigned if tp.topic in self._topics)
        self._epoch += 1
        self._paused = inputs
        if inputs:
            kafka.pause(*inputs)
            self.paused += 1

    def on_rebalance_end(self) -> None:
        """Faust ended the rebalance (main thread): the input partitions were sought and are
        active in Faust again; resume them in aiokafka, in its thread."""
        if self._thread is None or not self._paused:
            return
        epoch = self._epoch
        try:
            self._thread.thread_loop.call_soon_threadsafe(self._resume, epoch)
        except RuntimeError:  # the consumer's thread has stopped (shutdown): nothing to resume
            log.debug("consumer thread stopped: input partitions left paused")

    def _resume(self, epoch: int) -> None:
        """In the consumer's thread. A newer assignment (another rebalance began meanwhile) keeps
        its own partitions paused until its own end."""
        if epoch != self._epoch:
            return
        try:
            kafka = self._thread._ensure_consumer()
        except Exception:  # noqa: BLE001 - stopped meanwhile: nothing to resume
            return
        assigned = set(kafka.assignment())
        tps = [tp for tp in self._paused if tp in assigned]
        self._paused = frozenset()
        if tps:
            kafka.resume(*tps)
            self.resumed += 1
            log.debug("resumed %d input partitions after the rebalance", len(tps))
