"""Bytes to validated events, with limits a user can configure and errors that name the cause."""

from __future__ import annotations

from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.events import PromptEvent, ResponseEvent

E = TypeVar("E", PromptEvent, ResponseEvent)

OPTIONAL_FIELDS = frozenset({"tenant", "created_at", "metadata", "prompt"})


class InputLimits(BaseModel):
    """What an input message may be. Over-long text is kept whole in the event: the model input
    builder truncates its middle (`over_limit="truncate"`), or the message is dead-lettered
    (`over_limit="reject"`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_message_bytes: int = Field(1_048_576, gt=0)
    max_text_chars: int = Field(32_000, gt=0)
    over_limit: Literal["truncate", "reject"] = "truncate"
    required_fields: frozenset[str] = Field(
        default_factory=frozenset,
        description=f"Optional fields to require: any of {sorted(OPTIONAL_FIELDS)}.",
    )


class DecodeError(Exception):
    """An input that is not a valid event. `reason` is a short code for metrics and the DLQ."""

    def __init__(self, reason: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.field = field


def _diagnose(raw: bytes, exc: ValidationError) -> DecodeError:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        return DecodeError("not_utf8", f"value is not UTF-8 (byte {bad.start})")
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return DecodeError("not_json", f"value is not JSON: {first['msg']}")
    if first["type"] == "model_type":
        return DecodeError("invalid", "value is not a JSON object")
    problems = []
    for err in exc.errors(include_url=False)[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        problems.append(f"{loc}: {err['msg']}")
    field = ".".join(str(p) for p in first["loc"]) or None
    reason = "empty_text" if field == "text" and "empty" in first["msg"] else "invalid"
    return DecodeError(reason, "; ".join(problems), field)


def decode_event(raw: bytes | None, cls: type[E], limits: InputLimits) -> E:
    """Validate one Kafka message value as `cls`; raise DecodeError naming what is wrong."""
    if raw is None:
        raise DecodeError("invalid", "message has no value (tombstone)")
    if len(raw) > limits.max_message_bytes:
        raise DecodeError(
            "too_large",
            f"message is {len(raw)} bytes, over the limit of {limits.max_message_bytes}",
        )
    try:
        event = cls.model_validate_json(raw)
    except ValidationError as exc:
        raise _diagnose(raw, exc) from None
    for name in limits.required_fields:
        if getattr(event, name, None) in (None, {}):
            raise DecodeError("invalid", f"{name}: required by configuration", name)
    if limits.over_limit == "reject":
        for name in ("text", "prompt"):
            value = getattr(event, name, None)
            if value is not None and len(value) > limits.max_text_chars:
                raise DecodeError(
                    "too_long",
                    f"{name}: {len(value)} characters, over the limit of {limits.max_text_chars}",
                    name,
                )
    return event
