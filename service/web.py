"""The worker's web pages, on its Faust web server (GUARDSTREAM_WEB_PORT):

- `/healthz` (liveness): 200 while the process runs and its event loop is responsive: a timer
  beats every second; when the last beat is older than `STALE_AFTER_S`, 503.
- `/readyz` (readiness): 200 when the engine is loaded, the worker has joined its consumer
  group, recovered its prompts table and is flowing (no rebalance under way), every publishing
  lane is healthy (none stopped by an error that retrying cannot mend, none failing to produce
  for `PUBLISH_STALL_S`: `lanes_failing` says which and why), and the verdict cache is available
  or allowed to be degraded (GUARDSTREAM_CACHE_REQUIRED=false); else 503. A replica that the
  group gave no partition (more replicas than partitions: a hot spare) is ready too; its body says
  `"kafka_partitions": 0`. The JSON body says which check failed and the cache's state either
  way.
- `/metrics`: the Prometheus text exposition of `service.telemetry.metrics` (404 when
  GUARDSTREAM_METRICS_EXPORTER is not `prometheus`).

The timers that feed them live here too: the heartbeat, the consumer-lag refresh, and a PING
of the Redis cache through its breaker so that its state is known while no traffic flows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine.cache import RedisVerdictCache
from engine.guard import Guard
from service.config import Settings
from service.pipeline import Processor
from service.telemetry.lag import LagTracker
from service.telemetry.metrics import Metrics

log = logging.getLogger("guardstream.web")

HEARTBEAT_S = 1.0
STALE_AFTER_S = 10.0
LAG_REFRESH_S = 5.0
CACHE_PING_S = 2.0


class Health:
    """Liveness and readiness of one worker."""

    def __init__(
        self,
        app: Any,
        guard: Guard,
        settings: Settings,
        engine_loaded: asyncio.Event,
        processor: Processor | None = None,
    ) -> None:
        self._app = app
        self._processor = processor
        self._guard = guard
        self._settings = settings
        self._engine_loaded = engine_loaded
        self.last_beat = time.monotonic()
        self.loop_lag_s = 0.0
        self._beats = 0

    def beat(self) -> None:
        now = time.monotonic()
        if self._beats:  # the first beat has no previous one to be late after
            self.loop_lag_s = max(0.0, now - self.last_beat - HEARTBEAT_S)
        self._beats += 1
        self.last_beat = now

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        age = time.monotonic() - self.last_beat
        alive = age < STALE_AFTER_S
        body = {"status": "ok" if alive else "stale", "heartbeat_age_s": round(age, 3)}
        body["loop_lag_s"] = round(self.loop_lag_s, 3)
        return alive, body

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        app = self._app
        # A generation is set by every assignment the group coordinator hands out, an empty one
        # included; it is 0 until the first join.
        joined = int(getattr(app, "consumer_generation_id", 0) or 0) > 0
        try:
            partitions = len(app.consumer.assignment())
        except Exception:  # noqa: BLE001 - the consumer is not started yet
            partitions = 0
        consuming = joined and not app.rebalancing and app.flow_control.is_active()
        # Table recovery (the prompts of partitions taken over, read back from the changelog)
        # runs after the join; responses are consumed only once it is done.
        recovered = not getattr(app, "in_recovery", False)
        lanes = self._processor.unhealthy_lanes() if self._processor is not None else {}
        cache = self._guard.cache
        required = self._settings.cache_required
        state = getattr(cache, "state", "closed") if cache is not None else None
        available = cache.available if cache is not None else False
        checks = {
            "engine_loaded": self._engine_loaded.is_set(),
            "kafka_joined": joined,
            "consuming": consuming,
            "tables_recovered": recovered,
            "lanes_ok": not lanes,
            "cache_ok": available or not required or cache is None,
        }
        ready = all(checks.values())
        body: dict[str, Any] = {
            "ready": ready,
            **checks,
            "kafka_partitions": partitions,
            "lanes_failing": lanes,
            "cache": {
                "enabled": cache is not None,
                "required": required,
                "state": state,
                "degraded": cache is not None and not available,
            },
        }
        return ready, body


def install(app: Any, health: Health, metrics: Metrics, lag: LagTracker, guard: Guard) -> None:
    """Add the pages and their timers to the Faust app."""

    @app.timer(interval=HEARTBEAT_S, traced=False)
    async def guardstream_heartbeat() -> None:
        health.beat()
        metrics.loop_lag_s = health.loop_lag_s

    @app.timer(interval=LAG_REFRESH_S, traced=False)
    async def guardstream_consumer_lag() -> None:
        await lag.refresh()

    cache = guard.cache
    if isinstance(cache, RedisVerdictCache):

        @app.timer(interval=CACHE_PING_S, traced=False)
        async def guardstream_cache_ping() -> None:
            await cache.ping()

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        alive, body = health.liveness()
        return web.json(body, status=200 if alive else 503)

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        ready, body = health.readiness()
        return web.json(body, status=200 if ready else 503)

    @app.page("/metrics")
    async def prometheus_metrics(web: Any, request: Any) -> Any:
        if metrics.registry is None:
            return web.json({"error": "GUARDSTREAM_METRICS_EXPORTER is not prometheus"}, status=404)
        body = generate_latest(metrics.registry)
        return web.bytes(body, headers={"Content-Type": CONTENT_TYPE_LATEST})
