"""Traces, metrics and logs of the worker, built once from `Settings` (`Telemetry(settings)`).

    telemetry = Telemetry(settings)
    guard = build_guard(settings, on_batch=telemetry.metrics.on_batch,
                        tracer=telemetry.tracer, on_cache_state=telemetry.on_cache_state)
    runtime = Runtime(settings, guard, partitions=n, telemetry=telemetry)

Modules: `tracing` (provider, exporters, W3C headers), `metrics` (instruments and readers),
`track` (one message's spans and counters), `lag` (consumer lag), `logging` (formatters),
`faust_monitor` (Faust's monitor without per-message bookkeeping).
Nothing here is global: the tracer and meter providers are this object's, not OpenTelemetry's
process-wide defaults.
"""

from __future__ import annotations

# Aliased: importing the submodule `service.telemetry.logging` rebinds the name `logging` in
# this package's namespace.
import logging as stdlib_logging
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import Tracer

from service.config import Settings
from service.telemetry.metrics import Metrics
from service.telemetry.tracing import build_tracer_provider
from service.telemetry.track import Track

__all__ = ["Telemetry", "Track"]

log = stdlib_logging.getLogger("guardstream.telemetry")


class Telemetry:
    """The worker's tracer (None when tracing is off) and metrics.

    `span_exporter` and `metric_readers` are added to (for spans: replace) the configured ones;
    tests pass the SDK's in-memory exporter and reader.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        span_exporter: SpanExporter | None = None,
        metric_readers: Sequence[MetricReader] = (),
    ) -> None:
        self.settings = settings
        self.tracer_provider = build_tracer_provider(settings, span_exporter)
        self.tracer: Tracer | None = (
            self.tracer_provider.get_tracer("guardstream")
            if self.tracer_provider is not None
            else None
        )
        self.metrics = Metrics(settings, readers=metric_readers, exemplars=self.tracer is not None)

    @classmethod
    def off(cls, settings: Settings) -> Telemetry:
        """Counts in memory, exports nothing, traces nothing (a Processor built bare)."""
        quiet = settings.model_copy(update={"traces_exporter": "none", "metrics_exporter": "none"})
        return cls(quiet)

    def begin(self, event: Any) -> Track:
        """Start following one consumed message."""
        return Track(self, event)

    def on_cache_state(self, state: str) -> None:
        """The verdict cache's `on_state_change`: a metric and a log line."""
        self.metrics.cache_state(state)
        level = stdlib_logging.INFO if state == "half_open" else stdlib_logging.WARNING
        degraded = state != "closed"
        required = self.settings.cache_required
        log.log(
            level,
            "verdict cache %s (%s)",
            "degraded" if degraded else "available again",
            "readiness fails while it is" if degraded and required else "moderation goes on",
            extra={"cache_state": state},
        )

    def shutdown(self) -> None:
        """Flush and stop the exporters."""
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        self.metrics.shutdown()
