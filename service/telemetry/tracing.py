"""Tracing set-up and W3C trace context on Kafka headers.

Off by default (GUARDSTREAM_TRACES_EXPORTER=none): no tracer provider is built, the pipeline and
the guard get no tracer and skip every span call. The trace context of an input message
(`traceparent`, `tracestate` headers) is still copied onto its verdict, so a trace started
upstream continues downstream even when guardstream itself records nothing (what a no-op tracer
would propagate, without the cost of one).

On: `console` prints each finished span as one JSON line on stdout; `otlp` batches them to an
OpenTelemetry collector over gRPC or HTTP (GUARDSTREAM_OTLP_PROTOCOL, GUARDSTREAM_OTLP_ENDPOINT,
else the standard OTEL_EXPORTER_OTLP_* variables). The OTLP exporter is the `otlp` extra and
imported only when asked for.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import Span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service.config import Settings, SettingsError

TRACE_HEADERS = ("traceparent", "tracestate")
Headers = tuple[tuple[str, bytes], ...]

_PROPAGATOR = TraceContextTextMapPropagator()


class _KafkaHeaders(Getter[Mapping[str, Any]]):
    """Reads W3C headers from a Faust event's header dict (str keys, bytes values)."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            return None
        if isinstance(value, bytes | bytearray):
            value = bytes(value).decode("latin-1")
        return [str(value)]

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return [str(k) for k in carrier]


_GETTER = _KafkaHeaders()


def extract(headers: Mapping[str, Any]) -> Context:
    """The trace context carried by an input message's headers (empty when there is none)."""
    return _PROPAGATOR.extract(headers, getter=_GETTER)


def inject(span: Span) -> Headers:
    """`traceparent` (and `tracestate`) headers that continue the trace from `span`."""
    from opentelemetry import trace

    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return tuple((k, v.encode("ascii")) for k, v in carrier.items())


def passthrough(headers: Mapping[str, Any]) -> Headers:
    """The input's own trace headers, unchanged (tracing off: the trace skips guardstream)."""
    if not headers:
        return ()
    out = []
    for name in TRACE_HEADERS:
        value = headers.get(name)
        if isinstance(value, bytes):
            out.append((name, value))
    return tuple(out)


def _one_line(span: ReadableSpan) -> str:
    return str(span.to_json(indent=None)) + "\n"


def _otlp_exporter(settings: Settings) -> SpanExporter:
    try:
        if settings.otlp_protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )

            grpc_exporter: SpanExporter = GrpcExporter(endpoint=settings.otlp_endpoint)
            return grpc_exporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        endpoint = settings.otlp_endpoint
        if endpoint and not endpoint.rstrip("/").endswith("/v1/traces"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
        http_exporter: SpanExporter = HttpExporter(endpoint=endpoint)
        return http_exporter
    except ImportError as err:
        raise SettingsError(
            f"GUARDSTREAM_TRACES_EXPORTER=otlp needs the OTLP exporter, which is not installed "
            f"({err.name}): pip install 'guardstream[otlp]', or set "
            "GUARDSTREAM_TRACES_EXPORTER=console or none"
        ) from None


def resource(settings: Settings) -> Resource:
    return Resource.create({"service.name": "guardstream", "guardstream.app_id": settings.app_id})


def build_tracer_provider(
    settings: Settings, exporter: SpanExporter | None = None
) -> TracerProvider | None:
    """The provider for the configured exporter, or None when tracing is off. `exporter`
    (tests: an InMemorySpanExporter) is used instead of the configured one."""
    processor: SpanProcessor
    if exporter is not None:
        processor = SimpleSpanProcessor(exporter)
    elif settings.traces_exporter == "none":
        return None
    elif settings.traces_exporter == "console":
        processor = SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stdout, formatter=_one_line))
    else:
        processor = BatchSpanProcessor(_otlp_exporter(settings))
    provider = TracerProvider(resource=resource(settings))
    provider.add_span_processor(processor)
    return provider
