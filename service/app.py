"""The Faust app: topics, the prompt table, two small agents; health and metrics pages
(`service.web`).

The agents are plain `async for` loops over manually-acked streams; what happens to each message
lives in `service.pipeline.Processor`, and the in-order publish-then-ack in `service.lanes`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import faust

from engine.guard import Guard
from service.config import Settings
from service.eos import TransactionalPublisher
from service.kafka import faust_credentials
from service.messages import Outgoing
from service.pairing import PromptStore
from service.pipeline import Processor
from service.telemetry import Telemetry
from service.telemetry.faust_monitor import QuietMonitor
from service.telemetry.lag import LagTracker
from service.web import Health, install

log = logging.getLogger("guardstream.app")


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
        self.app = faust.App(
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
        )
        raw = {
            "key_type": bytes,
            "value_type": bytes,
            "key_serializer": "raw",
            "value_serializer": "raw",
        }
        self.prompts_topic = self.app.topic(settings.topic_prompts, **raw)
        self.responses_topic = self.app.topic(settings.topic_responses, **raw)
        self._out = {
            name: self.app.topic(name, **raw)
            for name in (settings.topic_verdicts, settings.topic_flagged, settings.topic_dlq)
        }
        self.table = self.app.Table(
            "recent-prompts",
            partitions=partitions,
            key_type=str,
            value_type=dict,
        )
        self.store = PromptStore(
            self.table.data,
            self._changelog,
            ttl_s=settings.prompt_table_ttl_s,
            max_entries=settings.prompt_table_max,
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
        )
        self.health = Health(self.app, guard, settings, self.started)
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

    async def _send(self, rec: Outgoing) -> Any:
        # Straight to the producer, as Topic.send ends up doing, without the FutureMessage,
        # serializer, sensor and callback layers around each record that the lanes do not use
        # (they await the broker's acknowledgement themselves).
        producer = await self.app.maybe_start_producer()
        return await producer.send(rec.topic, rec.key, rec.value, None, None, list(rec.headers))

    def _wire(self) -> None:
        app, settings, processor = self.app, self.settings, self.processor

        @app.task
        async def start_guard() -> None:
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

    def readiness(self) -> dict[str, Any]:
        return self.health.readiness()[1]
