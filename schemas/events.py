"""Events on the Kafka topics: chat input, verdicts out, dead letters."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from schemas.verdict import Verdict

#: Version of the event formats below; bumped on any incompatible change.
SCHEMA_VERSION = 1

EventKind = Literal["prompt", "response"]
Id = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class _ChatEvent(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    schema_version: int = SCHEMA_VERSION
    id: Id
    conversation_id: Id
    text: str = Field(description="The message text; must hold a non-blank character.")
    tenant: str | None = None
    created_at: datetime | None = Field(
        None, description="When the chat service created the message (ISO 8601)."
    )
    metadata: dict[str, str] = Field(default_factory=dict)

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text is empty")
        return value


class PromptEvent(_ChatEvent):
    """A user's message to the assistant (topic `chat.prompts`)."""


class ResponseEvent(_ChatEvent):
    """The assistant's answer (topic `chat.responses`)."""

    reply_to: Id = Field(description="The id of the PromptEvent this answers.")
    prompt: str | None = Field(
        None, description="The prompt's text, inline, when the producer has it."
    )


class SourceRef(BaseModel):
    """Where an input message was read."""

    model_config = ConfigDict(extra="forbid")

    topic: str
    partition: int
    offset: int


def verdict_event_id(kind: EventKind, source_id: str, model_id: str, model_revision: str) -> str:
    """Deterministic id: the same input message and model revision always give the same id."""
    material = "\x1f".join((kind, source_id, model_id, model_revision)).encode()
    return hashlib.sha256(material).hexdigest()[:32]


class VerdictEvent(BaseModel):
    """The guard's verdict on one chat message (topics `moderation.verdicts`, `.flagged`)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    event_id: str = Field(description="Deterministic: consumers drop duplicates by it.")
    source_id: str = Field(description="The id of the PromptEvent or ResponseEvent judged.")
    conversation_id: str
    kind: EventKind
    tenant: str | None = None
    verdict: Verdict = Field(
        description="The guard's verdict with the model's reasoning. A prompt's verdict may "
        "come from early exit (`verdict.early_exit`: generation stopped before the model's "
        "Task 2): it then carries Task 1's reasoning only, `completion` and `response` null, "
        "and is a trusted `recovered` verdict; a prompt whose Task 1 did not state its label "
        "cleanly is generated again in full, and its event carries that verdict "
        "(`early_exit` false)."
    )
    flagged: bool = Field(
        description="True when the request or response is harmful, or when no trustworthy "
        "verdict exists and the policy is fail_closed."
    )
    prompt_missing: bool = Field(
        False, description="A response judged without its prompt (unknown after the wait)."
    )
    model_id: str
    model_revision: str
    engine: str
    cached: bool
    latency_ms: float = Field(
        description="From consume to the verdict being ready (its publishing may wait longer, "
        "behind earlier offsets of its input partition: header guardstream-order-wait-ms)."
    )
    source: SourceRef
    event_time: datetime | None = None
    produced_at: datetime


class DeadLetter(BaseModel):
    """An input that could not be moderated, with its original bytes (topic `moderation.dlq`)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    reason: str = Field(description="Short code: not_utf8, not_json, invalid, too_long, ...")
    error: str = Field(description="Human-readable cause, naming the field when there is one.")
    payload_b64: str = Field(description="The original message value, base64.")
    key_b64: str | None = None
    source: SourceRef
    failed_at: datetime
