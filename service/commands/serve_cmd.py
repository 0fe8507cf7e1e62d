"""`guardstream serve`: the Faust worker that moderates the chat topics."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading

import faust

from engine.backends.base import Backend
from service.config import Settings, SettingsError

log = logging.getLogger("guardstream.serve")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the moderation worker (settings: GUARDSTREAM_* env)")
    p.set_defaults(func=_serve)


class _Worker(faust.Worker):  # type: ignore[misc]
    """Faust's worker with a hard deadline on graceful shutdown: if stopping takes longer than
    the grace period (a hung engine, an unreachable broker), the process exits; nothing it had
    not committed is lost, it is re-read by the next worker."""

    grace_period_s: float = 30.0

    def _on_sigterm(self) -> None:
        self._arm_deadline()
        super()._on_sigterm()

    def _on_sigint(self) -> None:
        self._arm_deadline()
        super()._on_sigint()

    def _arm_deadline(self) -> None:
        def expire() -> None:
            sys.stderr.write(
                f"guardstream: graceful shutdown exceeded {self.grace_period_s:.0f}s; exiting\n"
            )
            os._exit(3)

        timer = threading.Timer(self.grace_period_s, expire)
        timer.daemon = True
        timer.start()


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as err:
        print(f"guardstream: {err}", file=sys.stderr)
        return 2
    return run_worker(settings)


def run_worker(settings: Settings, backend: Backend | None = None) -> int:
    """Run the worker until it is stopped. `backend` replaces the configured one (benchmarks and
    fault tests wrap a backend to add cost or failures)."""
    from engine.cache import mask_url
    from service.app import Runtime
    from service.factory import build_guard
    from service.kafka import ensure_topics
    from service.telemetry import Telemetry
    from service.telemetry.logging import configure_logging

    log_config = configure_logging(settings)
    try:
        telemetry = Telemetry(settings)
    except SettingsError as err:
        print(f"guardstream: {err}", file=sys.stderr)
        return 2
    log.info(
        "starting: app_id=%s engine=%s model=%s kafka=%s redis=%s cache=%s traces=%s metrics=%s",
        settings.app_id,
        settings.engine,
        settings.model,
        settings.kafka_bootstrap_servers,
        mask_url(settings.redis_url.get_secret_value()),
        "required" if settings.cache_required else settings.cache_enabled,
        settings.traces_exporter,
        settings.metrics_exporter,
    )
    if settings.shadow:
        log.warning(
            "shadow mode (GUARDSTREAM_SHADOW): verdicts go to %s marked guardstream-shadow, "
            "nothing goes to %s",
            settings.topic_verdicts,
            settings.topic_flagged,
        )
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        partitions = loop.run_until_complete(ensure_topics(settings))
    except Exception as exc:  # noqa: BLE001 - say what failed and stop
        print(
            f"guardstream: cannot reach Kafka at {settings.kafka_bootstrap_servers} "
            f"(GUARDSTREAM_KAFKA_BOOTSTRAP_SERVERS): {exc}",
            file=sys.stderr,
        )
        return 2
    guard = build_guard(
        settings,
        backend,
        on_batch=telemetry.metrics.on_batch,
        tracer=telemetry.tracer,
        on_cache_state=telemetry.on_cache_state,
    )
    runtime = Runtime(settings, guard, partitions=partitions, telemetry=telemetry)
    worker = _Worker(
        runtime.app,
        loglevel=settings.log_level,
        loop=loop,
        logging_config=log_config,  # Faust's Worker re-applies it: our formatter, not its own
        quiet=settings.log_format == "json",  # no banner/spinner text between JSON lines
    )
    worker.spinner = None
    worker.grace_period_s = settings.grace_period_s
    worker.execute_from_commandline()
    return 0
