"""Spans of the guard's batches (OpenTelemetry API only; no SDK, no Kafka).

Each request remembers the span that was current when it was submitted (its caller's message
span). With a cache, its key is first looked up in a `guardstream.lookup` batch (a span that is the
root of its own trace, linked to its messages' spans, with a `guardstream.cache_lookup` child);
each message span gets a `guardstream.cache_lookup` child with its hit or miss. A miss then
joins a model batch: one `guardstream.batch` span per batch, also a trace of its own linked to
every message in it (deduplicated requests included), whose children are the batch's
`guardstream.generate` and `guardstream.cache_store`. The message spans of a model batch get
children made after the fact from its timings: `guardstream.batch_wait` (submit to batch start)
and `guardstream.generate`, linked to the batch's generation span.

The guard only builds a `BatchTracer` when it is given a tracer: without one, none of this runs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode, Tracer

#: One caller of a request: its span's context and when it submitted (time.monotonic()).
Parent = tuple[SpanContext, float]


def current_parent() -> Parent | None:
    """The current span's context (if any) and now, to keep with a submitted request."""
    ctx = trace.get_current_span().get_span_context()
    return (ctx, time.monotonic()) if ctx.is_valid else None


def _ns(monotonic_s: float, offset_ns: int) -> int:
    return offset_ns + int(monotonic_s * 1e9)


class BatchTrace:
    """The spans of one running batch; `parents[i]` are the callers of distinct item i."""

    def __init__(
        self,
        tracer: Tracer,
        parents: Sequence[Sequence[Parent]],
        started: float,
        name: str,
        span: str = "batch",
        waits: bool = True,
    ) -> None:
        self._tracer = tracer
        self._parents = parents
        # time.monotonic() -> epoch nanoseconds, for spans made from recorded timings.
        self._offset_ns = time.time_ns() - int(time.monotonic() * 1e9)
        links = [Link(ctx) for callers in parents for ctx, _ in callers]
        self.span: Span = tracer.start_span(
            f"{name}.{span}",
            context=Context(),  # a trace of its own, linked to its messages
            kind=SpanKind.INTERNAL,
            links=links,
            start_time=_ns(started, self._offset_ns),
            attributes={
                "guardstream.batch.size": len(parents),
                "guardstream.batch.messages": len(links),
            },
        )
        self._name = name
        self._in_batch = trace.set_span_in_context(self.span)
        if waits:
            for callers in parents:
                for ctx, enqueued in callers:
                    self._child(ctx, "batch_wait", enqueued, started, {})

    def cache_lookup(self, t0: float, t1: float, hits: Sequence[bool]) -> None:
        span = self._batch_child("cache_lookup", t0)
        span.set_attribute("guardstream.cache.hits", sum(hits))
        span.set_attribute("guardstream.cache.misses", len(hits) - sum(hits))
        span.end(end_time=_ns(t1, self._offset_ns))
        for callers, hit in zip(self._parents, hits, strict=True):
            for ctx, _ in callers:
                self._child(ctx, "cache_lookup", t0, t1, {"guardstream.cache.hit": hit})

    def generate(self, t0: float, t1: float, tokens: Sequence[int | None]) -> None:
        """The model call of the batch: every item of a model batch is generated."""
        span = self._batch_child("generate", t0)
        span.set_attribute("guardstream.generate.inputs", len(tokens))
        span.set_attribute("guardstream.generate.tokens", sum(t or 0 for t in tokens))
        span.end(end_time=_ns(t1, self._offset_ns))
        link = Link(span.get_span_context())
        for parents, count in zip(self._parents, tokens, strict=True):
            for ctx, _ in parents:
                attrs = {"guardstream.generate.tokens": count or 0}
                self._child(ctx, "generate", t0, t1, attrs, link)

    def cache_store(self, t0: float, t1: float, entries: int) -> None:
        span = self._batch_child("cache_store", t0)
        span.set_attribute("guardstream.cache.entries", entries)
        span.end(end_time=_ns(t1, self._offset_ns))

    def end(self, error: BaseException | None = None) -> None:
        if error is not None:
            self.span.record_exception(error)
            self.span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        self.span.end()

    def _batch_child(self, what: str, t0: float) -> Span:
        return self._tracer.start_span(
            f"{self._name}.{what}", context=self._in_batch, start_time=_ns(t0, self._offset_ns)
        )

    def _child(
        self,
        parent: SpanContext,
        what: str,
        t0: float,
        t1: float,
        attributes: dict[str, bool | int],
        link: Link | None = None,
    ) -> None:
        span = self._tracer.start_span(
            f"{self._name}.{what}",
            context=trace.set_span_in_context(trace.NonRecordingSpan(parent)),
            links=[link] if link is not None else (),
            start_time=_ns(t0, self._offset_ns),
            attributes=attributes,
        )
        span.end(end_time=_ns(t1, self._offset_ns))


class BatchTracer:
    """Makes a `BatchTrace` per batch with the given tracer."""

    def __init__(self, tracer: Tracer, name: str = "guardstream") -> None:
        self._tracer = tracer
        self._name = name

    def start(self, parents: Sequence[Sequence[Parent]], started: float) -> BatchTrace:
        """A model batch: `batch_wait` children for its messages, then its stages."""
        return BatchTrace(self._tracer, parents, started, self._name)

    def lookup(self, parents: Sequence[Sequence[Parent]], started: float) -> BatchTrace:
        """A cache lookup batch (`guardstream.lookup`), which runs before the model batches;
        its messages get their `cache_lookup` child from it."""
        return BatchTrace(self._tracer, parents, started, self._name, "lookup", waits=False)
