"""The Faust app: topics, the prompt table, two small agents; health and metrics pages
(`service.web`).

The agents are plain `async for` loops over manually-acked streams; what happens to each message
lives in `service.pipeline.Processor`, and the in-order publish-then-ack in `service.lanes`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

import faust

from engine.guard import Guard
from service.acks import AckGuard
from service.config import Settings
from service.eos import TransactionalPublisher
from service.kafka import faust_credentials
from service.messages import Outgoing
from service.pairing import PromptStore
from service.pipeline import Processor
from service.resume import ResumeGuard
from service.telemetry import Telemetry
from service.telemetry.faust_monitor import QuietMonitor
from service.telemetry.lag import LagTracker
from service.web import Health, install

log = logging.getLogger("guardstream.app")

#: How often the pairing clock looks whether each prompts partition is read to its end.
PAIRING_CLOCK_S = 0.25


class GuardApp(faust.App):  # type: ignore[misc]  # faust is untyped for mypy here
    """A Faust app that tells the worker, before Faust waits for the events it handed out, that
    partitions are being revoked or that it stops (`give_back`): then the responses waiting for
    their prompt are handed back instead of being waited for (`Processor.give_back`)."""

    give_back: Callable[[], object] | None = None
    #: Holds the input partitions in aiokafka until a rebalance is over (`service.resume`).
    resume_guard: ResumeGuard | None = None

    def _new_consumer(self) -> Any:
        consumer = super()._new_consumer()
        if self.resume_guard is not None:
            self.resume_guard.install(consumer)
        return consumer

    async def _on_partitions_revoked(self, revoked: Any) -> None:
        # Here, on the app's event loop, before Faust waits for the events it handed out; not
        # in `on_rebalance_start`, which Faust calls in the consumer's own thread, where the
        # lanes, futures and semaphores of this loop must not be touched.
        if self.give_back is not None:
            self.give_back()
        await super()._on_partitions_revoked(revoked)

    def on_rebalance_end(self) -> None:
        super().on_rebalance_end()
        if self.resume_guard is not None:
            self.resume_guard.on_rebalance_end()

    async def on_stop(self) -> None:
        if self.give_back is not None:
            self.give_back()
        await super().on_stop()


class Runtime:
    """A configured worker: the Faust app plus the guard and the processor it drives."""

    def __init__(
        self,
        settings: Settings,
        guard: Guard,
        *,
        partitions: int,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.guard = guard
        self.telemetry = telemetry or Telemetry(settings)
        self.started = asyncio.Event()
        self.app = GuardApp(
            settings.app_id,
            broker=[f"kafka://{h.strip()}" for h in settings.kafka_bootstrap_servers.split(",")],
            broker_credentials=faust_credentials(settings),
            store="memory://",
            topic_partitions=partitions,
            topic_replication_factor=settings.topic_replication_factor,
            processing_guarantee=settings.processing_guarantee,
            consumer_auto_offset_reset="earliest",
            producer_acks=-1,
            producer_linger_ms=5,
            stream_wait_empty=True,
            web_enabled=True,
            web_host=settings.web_host,
            web_port=settings.web_port,
            web_in_thread=False,
            table_cleanup_interval=60.0,
            broker_commit_interval=1.0,
            broker_session_timeout=settings.kafka_session_timeout_s,
            broker_heartbeat_interval=min(3.0, settings.kafka_session_timeout_s / 3),
            worker_redirect_stdouts=False,
            monitor=QuietMonitor(),
            # Standby copies do not shorten a failover with the in-memory store: it keeps no
            # offsets, so a partition taken over is replayed from its changelog's start anyway,
            # and the copy is dropped when recovery completes (faust.stores.memory). They
            # would only cost every worker the changelog's traffic.
            table_standby_replicas=0,
        )
        raw = {
            "key_type": bytes,
            "value_type": bytes,
            "key_serializer": "raw",
            "value_serializer": "raw",
        }
        self.app.resume_guard = ResumeGuard((settings.topic_prompts, settings.topic_responses))
        self.prompts_topic = self.app.topic(settings.topic_prompts, **raw)
        self.responses_topic = self.app.topic(settings.topic_responses, **raw)
        self._out = {
            name: self.app.topic(name, **raw)
            for name in (settings.topic_verdicts, settings.topic_flagged, settings.topic_dlq)
        }
        # Values are JSON objects; value_type None reads them back from the changelog as dicts
        # (Faust decodes any other type with `from_data`, which `dict` has not: a worker that
        # recovered a partition with stored prompts never became ready).
        self.table = self.app.Table(
            "recent-prompts",
            partitions=partitions,
            key_type=str,
            value_type=None,
            # Prompts older than the TTL are never read: let the broker delete them from the
            # changelog too, so that a recovery replays at most the TTL's worth of it.
            extra_topic_configs={
                "cleanup.policy": "compact,delete",
                "retention.ms": str(2 * settings.prompt_table_ttl_s * 1000),
            },
        )
        self.store = PromptStore(
            self.table.data,
            self._changelog,
            ttl_s=settings.prompt_table_ttl_s,
            max_entries=settings.prompt_table_max,
            grace_s=settings.pairing_wait_ms / 1000,
            max_wait_s=settings.pairing_max_wait_s,
            changelog_record=self._changelog_record,
        )
        eos: TransactionalPublisher | None = None
        if settings.processing_guarantee == "exactly_once":
            eos = TransactionalPublisher(self.app)
            eos.install()
        self.processor = Processor(
            settings,
            guard,
            self.store,
            self._send,
            engine_name=guard.backend.name,
            transact=eos.publish if eos is not None else None,
            telemetry=self.telemetry,
            partitions=partitions,
        )
        self.app.give_back = self.processor.give_back
        self.processor.held_prompt_partitions = self._held_prompt_partitions
        self.acks = AckGuard()
        self.processor.take = self.acks.take
        self.processor.current = self._current
        self.health = Health(self.app, guard, settings, self.started, self.processor)
        lag = LagTracker(self.app, (settings.topic_prompts, settings.topic_responses))
        self.telemetry.metrics.watch_guard(guard)
        self.telemetry.metrics.watch_lag(lag.current)
        install(self.app, self.health, self.telemetry.metrics, lag, guard)
        self._wire()

    def _changelog(self, partition: int, key: str, value: dict[str, Any] | None) -> None:
        if value is None:
            self.table.send_changelog(partition, key, None, value_serializer="raw")
        else:
            self.table.send_changelog(partition, key, value)

    def _changelog_record(self, partition: int, key: str, value: dict[str, Any]) -> Outgoing:
        """A table entry as Faust writes it to the changelog (its key and value serializers),
        for the prompt's lane to publish with the prompt's own output."""
        serializers, table = self.app.serializers, self.table
        return Outgoing(
            table.changelog_topic.get_topic_name(),
            serializers.dumps_key(str, key, serializer=table.key_serializer),
            serializers.dumps_value(None, value, serializer=table.value_serializer),
            partition=partition,
        )

    async def _send(self, rec: Outgoing) -> Any:
        # Straight to the producer, as Topic.send ends up doing, without the FutureMessage,
        # serializer, sensor and callback layers around each record that the lanes do not use
        # (they await the broker's acknowledgement themselves).
        producer = await self.app.maybe_start_producer()
        return await producer.send(
            rec.topic, rec.key, rec.value, rec.partition, None, list(rec.headers)
        )

    def _wire(self) -> None:
        app, settings, processor = self.app, self.settings, self.processor

        @app.task
        async def start_guard() -> None:
            self.acks.install(app.consumer)  # before any event reaches the agents
            await self.guard.start()
            # What start-up made (Faust, the model, the schemas) lives as long as the worker:
            # leave it out of the collector's scans, each full one of which stalled the loop
            # for 60-100 ms (the latency bench's p99 tail).
            gc.freeze()
            self.started.set()
            log.info(
                "guard ready: engine=%s model=%s revision=%s",
                self.guard.backend.name,
                self.guard.model_id,
                self.guard.revision,
            )

        @app.agent(self.prompts_topic, name="guardstream.prompts")
        async def prompts(stream: Any) -> None:
            manual = stream.noack()
            await self.started.wait()
            async for event in manual.events():
                await processor.on_prompt(event, manual.ack)

        @app.agent(self.responses_topic, name="guardstream.responses")
        async def responses(stream: Any) -> None:
            manual = stream.noack()
            await self.started.wait()
            async for event in manual.events():
                await processor.on_response(event, manual.ack)

        @app.timer(interval=PAIRING_CLOCK_S, traced=False)
        async def pairing_clock() -> None:
            self._tick_pairing_clock()

        @app.on_partitions_revoked.connect
        async def drop_lanes(sender: Any, revoked: Any, **kwargs: Any) -> None:
            processor.drop_lanes(revoked)

        @app.timer(interval=30.0)
        async def sweep_prompts() -> None:
            dropped = self.store.sweep()
            if dropped:
                log.info("dropped %d expired prompts from the pairing table", dropped)

        @app.on_before_shutdown.connect
        async def drain(sender: Any, **kwargs: Any) -> None:
            grace = settings.grace_period_s
            done = await processor.close(timeout=grace * 0.8)
            await self.guard.close(drain=done, timeout=grace * 0.1)
            log.info("shutdown: in-flight verdicts %s", "published" if done else "abandoned")
            self.telemetry.shutdown()

    def _current(self, message: Any) -> bool:
        """The message is of the current assignment: fetched in the consumer's generation, and
        no rebalance is under way (the test Faust's stream applies to what it hands out)."""
        app = self.app
        generation = getattr(message, "generation_id", None)
        return not app.rebalancing and (
            generation is None or generation == app.consumer_generation_id
        )

    def _held_prompt_partitions(self) -> frozenset[int]:
        try:
            assignment = self.app.consumer.assignment()
        except Exception:  # noqa: BLE001 - the consumer is not started yet
            return frozenset()
        topic = self.settings.topic_prompts
        return frozenset(tp.partition for tp in assignment if tp.topic == topic)

    def _tick_pairing_clock(self) -> None:
        """Move the watermark of each prompts partition that is read to its end to the time of
        the fetch that said so: no prompt produced before then (less the grace) can still come
        there. Not to now: under load the last fetch can be seconds old, and a prompt appended
        since would be passed over (seen as responses moderated without their prompt, their
        prompt already in Kafka, when the machine was busy)."""
        app = self.app
        if app.rebalancing or not self.started.is_set():
            return
        consumer = app.consumer
        try:
            assignment = consumer.assignment()
        except Exception:  # noqa: BLE001 - the consumer is not started yet
            return
        # Faust's committed offsets (next offset to read, per partition; set at assignment and
        # by every commit): a partition with nothing stored since then is at its end when its
        # committed offset is.
        committed = getattr(consumer, "_committed_offset", {})
        fetched_at = _fetch_clock(consumer)
        topic = self.settings.topic_prompts
        for tp in assignment:
            if tp.topic != topic:
                continue
            highwater = consumer.highwater(tp)
            if highwater is None or highwater < 0:
                continue
            last = self.processor.prompt_offsets.get(tp.partition)
            done = committed.get(tp)
            if (
                highwater == 0
                or (last is not None and last + 1 >= highwater)
                or (done is not None and done >= highwater)
            ):
                at = fetched_at(tp)
                if at is not None:
                    self.store.advance(tp.partition, at)

    def readiness(self) -> dict[str, Any]:
        return self.health.readiness()[1]


def _fetch_clock(consumer: Any) -> Callable[[Any], float | None]:
    """When the consumer last had a fetch response for a partition (its highwater is as of
    then), epoch seconds; None when not known. aiokafka's `last_poll_timestamp`, reached through
    Faust's consumer thread (faust-streaming 0.15: `Consumer._thread._ensure_consumer()`)."""
    try:
        kafka = consumer._thread._ensure_consumer()
    except Exception:  # noqa: BLE001 - not started, or another driver: no watermark move
        return lambda tp: None

    def fetched_at(tp: Any) -> float | None:
        try:
            ms = kafka.last_poll_timestamp(tp)
        except Exception:  # noqa: BLE001 - not assigned (any more)
            return None
        return min(time.time(), ms / 1000) if ms else None

    return fetched_at
