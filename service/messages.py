"""Verdict events and dead letters as they go out: building them, the failure policy, bytes."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime

from engine.guard import ModerationResult
from schemas.events import (
    DeadLetter,
    EventKind,
    PromptEvent,
    ResponseEvent,
    SourceRef,
    VerdictEvent,
    verdict_event_id,
)
from schemas.verdict import Verdict


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One record to produce."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    partition: int | None = None  # None: the producer's partitioner decides


def is_flagged(verdict: Verdict, policy: str) -> bool:
    """Harmful request or response; or, with fail_closed, a verdict that is not trusted
    (`Verdict.trusted`: incomplete, conflicting, unparsed, truncated, or no output at all).
    Under fail_open an untrusted verdict goes out unflagged, its `trust` saying why."""
    if verdict.harmful:
        return True
    return policy == "fail_closed" and not verdict.trusted


def verdict_event(
    event: PromptEvent | ResponseEvent,
    kind: EventKind,
    result: ModerationResult,
    *,
    source: SourceRef,
    model_id: str,
    model_revision: str,
    engine: str,
    policy: str,
    latency_ms: float,
    prompt_missing: bool = False,
) -> VerdictEvent:
    return VerdictEvent(
        event_id=verdict_event_id(kind, event.id, model_id, model_revision),
        source_id=event.id,
        conversation_id=event.conversation_id,
        kind=kind,
        tenant=event.tenant,
        verdict=result.verdict,
        flagged=is_flagged(result.verdict, policy),
        prompt_missing=prompt_missing,
        model_id=model_id,
        model_revision=model_revision,
        engine=engine,
        cached=result.cached,
        latency_ms=round(latency_ms, 3),
        source=source,
        event_time=event.created_at,
        produced_at=datetime.now(UTC),
    )


#: The most bytes of the original value (and key) a dead letter carries. A dead letter must stay
#: under the producer's request limit (Faust's default: 1,000,000 bytes) with its key, once base64
#: has made them 4/3 as many, or it could never be published and would block its partition for
#: good; a longer value or key is cut to its first bytes, and the dead letter's `error` says so.
DEAD_LETTER_MAX_PAYLOAD = 512 * 1024
DEAD_LETTER_MAX_KEY = 16 * 1024


def dead_letter_key(key: bytes | None) -> bytes | None:
    """The key a dead letter is published with: the input's key, cut to DEAD_LETTER_MAX_KEY."""
    return key[:DEAD_LETTER_MAX_KEY] if key is not None else None


def dead_letter(
    raw: bytes | None, key: bytes | None, source: SourceRef, reason: str, error: str
) -> DeadLetter:
    payload = raw or b""
    if len(payload) > DEAD_LETTER_MAX_PAYLOAD:
        cut = f"payload cut to its first {DEAD_LETTER_MAX_PAYLOAD} of {len(payload)} bytes"
        error = f"{error} ({cut})"
        payload = payload[:DEAD_LETTER_MAX_PAYLOAD]
    if key is not None and len(key) > DEAD_LETTER_MAX_KEY:
        error = f"{error} (key cut to its first {DEAD_LETTER_MAX_KEY} of {len(key)} bytes)"
    key = dead_letter_key(key)
    return DeadLetter(
        reason=reason,
        error=error,
        payload_b64=base64.b64encode(payload).decode("ascii"),
        key_b64=base64.b64encode(key).decode("ascii") if key is not None else None,
        source=source,
        failed_at=datetime.now(UTC),
    )


def dead_letter_headers(letter: DeadLetter) -> tuple[tuple[str, bytes], ...]:
    """Headers a DLQ consumer can filter on without decoding the value."""
    return (
        ("guardstream-error-reason", letter.reason.encode()),
        ("guardstream-source-topic", letter.source.topic.encode()),
        ("guardstream-source-partition", str(letter.source.partition).encode()),
        ("guardstream-source-offset", str(letter.source.offset).encode()),
    )
