"""Exactly-once publishing: a lane's run of records and its input offset in one Kafka transaction.

Faust's `processing_guarantee="exactly_once"` commits input offsets through one transactional
producer per input partition, but `Topic.send` picks the transactional producer by the partition
of the *output* record, and for a topic the worker does not consume (our verdict, flagged and
dead-letter topics) it finds none and sends with the plain producer: the verdicts were written
outside any transaction, so a crash after a verdict was written and before its offset was
committed duplicated it even for a `read_committed` reader.

`TransactionalPublisher.publish` writes a run of records with the transactional producer of the
input partition they come from (the one Faust commits that partition's offsets with), adds the
run's next offset to the same transaction, commits it, and only then acks the events to Faust.
It holds the producer's transaction lock throughout, which Faust's own commits also take, so no
commit can slip between the records and their offset. On a failure the transaction is aborted
(its records are never visible to a `read_committed` reader, its offset never committed) and the
run is written again by the lane's retry policy. A cancelled publish (a lane stopped at shutdown
or at a revocation) aborts too.

Faust's own periodic commit still runs (it keeps transactions short: the prompt table's
changelog records go out in them), but through `commit_transactions` below: Faust works out the
offsets to commit before it waits for the lock, so by the time it holds the lock they can be
older than what `publish` has committed meanwhile, and committing them would move the group's
offset back (a crash then re-reads, and re-publishes, what was already published). Offsets not
beyond what was committed already are dropped under the lock.

This relies on two attributes of Faust's aiokafka producer driver (`_transaction_producers`,
`_trn_locks`; faust-streaming 0.15): `install` checks that they are there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import ProducerFenced

from service.messages import Outgoing

log = logging.getLogger("guardstream.eos")

Ack = Callable[[Any], Awaitable[Any]]


class NoTransactionalProducer(RuntimeError):
    """The input partition has no transactional producer (yet): retried."""


class TransactionalPublisher:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.transactions = 0  # committed by `publish`
        self.aborted = 0  # aborted by `publish` (a failure or a cancellation)
        self._committed: dict[tuple[str, int], int] = {}  # next offset to read, per partition

    def install(self) -> None:
        """Route Faust's own transaction commits through `commit_transactions`."""
        producer = self.app.producer
        for attr in ("_transaction_producers", "_trn_locks", "commit_transactions"):
            if not hasattr(producer, attr):
                raise RuntimeError(
                    f"GUARDSTREAM_PROCESSING_GUARANTEE=exactly_once needs Faust's aiokafka "
                    f"producer driver ({type(producer).__name__} has no {attr})"
                )
        producer.commit_transactions = self.commit_transactions

    def _transactional_id(self, topic: str, partition: int) -> str:
        # Faust's own naming (faust.transport.consumer.TransactionManager.commit).
        group = self.app.assignor.group_for_topic(topic)
        return f"{self.app.conf.id}-{group}-{partition}"

    async def publish(self, records: Sequence[Outgoing], events: Sequence[Any], ack: Ack) -> None:
        """Write `records`, commit the offset after the last of `events` in the same transaction,
        then ack `events`. On any failure, cancellation included, the transaction is aborted
        (nothing of it becomes visible to a `read_committed` reader, its offset is not committed)
        before the error goes on; the lane's retry policy (`service.lanes`) tries again."""
        last = events[-1].message
        tp = TopicPartition(last.topic, last.partition)
        tid = self._transactional_id(last.topic, last.partition)
        producer = self.app.producer
        lock = producer._trn_locks.get(tid)
        txp = producer._transaction_producers.get(tid)
        if lock is None or txp is None:
            raise NoTransactionalProducer(f"no transactional producer {tid} (not assigned?)")
        async with lock:
            try:
                pending = [
                    await txp.send(
                        rec.topic,
                        rec.value,
                        key=rec.key,
                        partition=rec.partition,
                        headers=list(rec.headers),
                    )
                    for rec in records
                ]
                await asyncio.gather(*pending)
                await txp.send_offsets_to_transaction({tp: last.offset + 1}, self.app.conf.id)
                await txp.commit_transaction()
            except ProducerFenced as exc:
                # Another worker owns this partition now and re-reads these events; a zombie
                # must stop, as Faust's own commit does on fencing.
                log.error("transactional producer %s fenced: stopping the worker", tid)
                await self.app.crash(exc)
                raise
            except BaseException:
                # Cancelled (a lane stopped at shutdown or revocation) or failed: abort, shielded
                # from the cancellation, so that the open transaction never commits later with
                # these records and without their offset.
                await asyncio.shield(_steps(txp, tid, txp.abort_transaction, txp.begin_transaction))
                self.aborted += 1
                raise
            self.transactions += 1
            key = (last.topic, last.partition)
            self._committed[key] = max(self._committed.get(key, 0), last.offset + 1)
            for event in events:
                await ack(event)
            await _steps(txp, tid, txp.begin_transaction)

    async def commit_transactions(
        self,
        tid_to_offset_map: Mapping[str, Mapping[Any, int]],
        group_id: str,
        start_new_transaction: bool = True,
    ) -> None:
        """Faust's commit (faust.transport.drivers.aiokafka.Producer.commit_transactions), minus
        offsets that `publish` already committed (or went beyond) while Faust waited."""
        producer = self.app.producer
        for tid, offsets in tid_to_offset_map.items():
            async with producer._trn_locks[tid]:
                txp = producer._transaction_producers.get(tid)
                if txp is None:
                    log.warning("commit for unknown transactional producer %s", tid)
                    continue
                fresh = {
                    tp: offset
                    for tp, offset in offsets.items()
                    if offset > self._committed.get((tp.topic, tp.partition), -1)
                }
                if fresh:
                    await txp.send_offsets_to_transaction(fresh, group_id)
                    for tp, offset in fresh.items():
                        self._committed[(tp.topic, tp.partition)] = offset
                await txp.commit_transaction()
                if start_new_transaction:
                    await txp.begin_transaction()


async def _steps(txp: Any, tid: str, *steps: Callable[[], Awaitable[None]]) -> None:
    """Run transaction steps (abort, begin); a failure is only logged: the next attempt's
    writes fail and report it, and abort and begin again."""
    for step in steps:
        try:
            await step()
        except Exception as exc:  # noqa: BLE001 - the next attempt reports what still fails
            log.debug("transactional producer %s: %s failed: %r", tid, step.__name__, exc)
