"""`Track`: what telemetry keeps of one consumed message, from consume to the broker's ack.

The processor makes one per message (`Telemetry.begin(event)`), wraps the decode in `parse()`
and the guard submission in `current()` (so the guard links its batch to this message's span),
asks `verdict(...)` or `dead_letter(...)` for the output's trace headers, and the lane calls
`done()` after the broker took the output and the input was acked: that is when the counters
move, the end-to-end latency is recorded and the spans end.

With tracing off a Track holds no span, and `parse()`/`current()` are a shared null context.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from schemas.events import PromptEvent, ResponseEvent, VerdictEvent
from service.telemetry.tracing import Headers, extract, inject, passthrough

if TYPE_CHECKING:
    from service.telemetry import Telemetry

log = logging.getLogger("guardstream.messages")

_NULL: AbstractContextManager[Any] = nullcontext()
_KIND_ATTRS = {"prompt": {"kind": "prompt"}, "response": {"kind": "response"}}
_TASKS = {"prompt": ("request",), "response": ("request", "completion", "response")}


class Track:
    __slots__ = ("_chat", "_dead", "_event", "_produce", "_tel", "_verdict", "span")

    def __init__(self, tel: Telemetry, event: Any) -> None:
        self._tel = tel
        self._event = event
        self._verdict: VerdictEvent | None = None
        self._chat: PromptEvent | ResponseEvent | None = None
        self._dead: str | None = None
        self._produce: Span | None = None
        msg = event.message
        tel.metrics.consumed[(msg.topic,)] += 1
        tracer = tel.tracer
        self.span: Span | None = None
        if tracer is not None:
            self.span = tracer.start_span(
                "guardstream.message",
                context=extract(event.headers or {}),
                kind=SpanKind.CONSUMER,
                attributes={
                    "messaging.system": "kafka",
                    "messaging.operation.type": "process",
                    "messaging.destination.name": msg.topic,
                    "messaging.destination.partition.id": str(msg.partition),
                    "messaging.kafka.offset": msg.offset,
                },
            )

    # --- while it is processed ---------------------------------------------------------------

    def parse(self) -> AbstractContextManager[Any]:
        """Around the decode: a `guardstream.parse` span."""
        if self.span is None or self._tel.tracer is None:
            return _NULL
        return self._tel.tracer.start_as_current_span(
            "guardstream.parse", context=trace.set_span_in_context(self.span)
        )

    def current(self) -> AbstractContextManager[Any]:
        """Around `guard.submit`: this message's span is the current one."""
        if self.span is None:
            return _NULL
        return trace.use_span(self.span, end_on_exit=False)

    def verdict(self, ve: VerdictEvent, chat: PromptEvent | ResponseEvent) -> Headers:
        """The verdict is built: trace headers for its records."""
        self._verdict = ve
        self._chat = chat
        if self.span is not None:
            v = ve.verdict
            labels = {f"guardstream.verdict.{t}": getattr(v, t) or "none" for t in _TASKS[ve.kind]}
            self.span.set_attributes(
                {
                    "messaging.message.id": ve.source_id,
                    "guardstream.kind": ve.kind,
                    "guardstream.flagged": ve.flagged,
                    "guardstream.cached": ve.cached,
                    "guardstream.verdict.found": v.found,
                    "guardstream.verdict.trust": v.trust,
                    **labels,
                }
            )
            if v.engine_error is not None:
                self.span.set_status(Status(StatusCode.ERROR, "engine error"))
        return self._headers(self._tel.settings.topic_verdicts)

    def dead_letter(self, reason: str) -> Headers:
        """The input goes to the dead-letter topic: trace headers for that record."""
        self._dead = reason
        if self.span is not None:
            self.span.set_attribute("guardstream.dead_letter.reason", reason)
            self.span.set_status(Status(StatusCode.ERROR, f"dead letter: {reason}"))
        return self._headers(self._tel.settings.topic_dlq)

    def _headers(self, topic: str) -> Headers:
        tracer = self._tel.tracer
        if self.span is None or tracer is None:
            return passthrough(self._event.headers)
        self._produce = tracer.start_span(
            "guardstream.produce",
            context=trace.set_span_in_context(self.span),
            kind=SpanKind.PRODUCER,
            attributes={"messaging.system": "kafka", "messaging.destination.name": topic},
        )
        return inject(self._produce)

    # --- published ---------------------------------------------------------------------------

    def done(self) -> None:
        """The output is acknowledged by the broker and the input acked (the lane's on_done)."""
        try:
            self._done()
        except Exception:  # a telemetry bug must never stop a lane
            log.exception("telemetry of a published message failed")

    def _done(self) -> None:
        metrics = self._tel.metrics
        ve = self._verdict
        if ve is not None:
            v = ve.verdict
            metrics.verdicts[(ve.kind, v.trust)] += 1
            for task in _TASKS[ve.kind]:
                metrics.labels[(ve.kind, task, getattr(v, task) or "none")] += 1
            if ve.flagged:
                metrics.flagged[(ve.kind,)] += 1
            latency = self._age()
            if latency is not None:
                metrics.end_to_end.record(latency, _KIND_ATTRS[ve.kind])
        elif self._dead is not None:
            metrics.dead_letters[(self._dead,)] += 1
        if self._produce is not None:
            self._produce.end()
        if self.span is not None:
            self.span.end()
        if ve is not None and log.isEnabledFor(logging.DEBUG):
            fields: dict[str, Any] = {
                **self.fields(),
                "event_id": ve.event_id,
                "kind": ve.kind,
                "flagged": ve.flagged,
                "cached": ve.cached,
                "latency_ms": ve.latency_ms,
                **{t: getattr(ve.verdict, t) or "none" for t in _TASKS[ve.kind]},
            }
            if self._tel.settings.log_content and self._chat is not None:
                fields["text"] = self._chat.text
                if isinstance(self._chat, ResponseEvent) and self._chat.prompt is not None:
                    fields["prompt"] = self._chat.prompt
            log.debug("verdict published", extra=fields)

    def _age(self) -> float | None:
        """Seconds since the message was created (created_at, else its Kafka timestamp)."""
        assert self._verdict is not None
        created = self._verdict.event_time
        if created is not None:
            if created.tzinfo is None:
                created = created.replace(tzinfo=UTC)
            born = created.timestamp()
        else:
            born = getattr(self._event.message, "timestamp", None) or 0.0
            if born <= 0:
                return None
        return max(0.0, time.time() - born)

    # --- logs --------------------------------------------------------------------------------

    def fields(self) -> dict[str, Any]:
        """Ids for a log line about this message (never its text)."""
        msg = self._event.message
        out: dict[str, Any] = {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset}
        if self.span is not None:
            ctx = self.span.get_span_context()
            out["trace_id"] = format(ctx.trace_id, "032x")
            out["span_id"] = format(ctx.span_id, "016x")
        else:
            parent = (self._event.headers or {}).get("traceparent")
            parts = parent.split(b"-") if isinstance(parent, bytes) else []
            if len(parts) == 4 and len(parts[1]) == 32:
                out["trace_id"] = parts[1].decode("ascii", "replace")
        if self._verdict is not None:
            out["message_id"] = self._verdict.source_id
            out["conversation_id"] = self._verdict.conversation_id
        return out
