"""Log lines: JSON (one object a line) or human-readable text, with trace and message ids, and
never a secret.

`logging_config(settings)` is a `logging.config.dictConfig` dict; the worker hands it to Faust's
Worker (which otherwise installs its own coloured handler) and applies it once before that, so
that every line from start to exit has the same shape.

Fields a line may carry besides the standard ones (`ts`, `level`, `logger`, `message`):
`trace_id`, `span_id` (from the `extra` of the call, else from the current OpenTelemetry span),
and whatever the call passes in `extra` among `LOG_FIELDS` (message ids, Kafka coordinates,
verdict labels). Message text is only ever passed by callers when `log_content` is on.

Secrets are removed from the final text of each line (exception tracebacks included): the
values of the secret settings, and any `scheme://user:password@` in a URL.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from opentelemetry import trace

from service.config import Settings

#: `extra` keys copied into a line (in this order), when a call passes them.
LOG_FIELDS = (
    "trace_id",
    "span_id",
    "message_id",
    "conversation_id",
    "event_id",
    "kind",
    "topic",
    "partition",
    "offset",
    "reason",
    "flagged",
    "cached",
    "request",
    "response",
    "completion",
    "latency_ms",
    "cache_state",
    "text",
    "prompt",
)

#: Third-party loggers kept at INFO or above even when GUARDSTREAM_LOG_LEVEL=DEBUG: at DEBUG
#: they log record contents and protocol chatter.
_QUIET_LIBRARIES = ("aiokafka", "kafka", "faust", "mode", "aiohttp", "redis", "urllib3", "grpc")

_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s/]+@")
_REDACTED = "***"


class Redactor:
    """Removes secrets from text: known secret values, and passwords inside URLs."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so that a secret containing another is removed whole.
        self._secrets = sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, _REDACTED)
        if "://" in text:
            text = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}{_REDACTED}@", text)
        return text


def secret_values(settings: Settings) -> list[str]:
    """The secret settings' values: the SASL password, the API key, the Redis URL's password
    (in its user info or its query string; the rest of the URL is fit to log)."""
    out: list[str] = []
    for secret in (settings.kafka_sasl_password, settings.openai_api_key):
        if secret is not None:
            out.append(secret.get_secret_value())
    parts = urlsplit(settings.redis_url.get_secret_value())
    if parts.password:
        out.append(parts.password)
    out.extend(v for k, v in parse_qsl(parts.query) if k.lower() == "password")
    return out


def _trace_fields(record: logging.LogRecord) -> dict[str, str]:
    trace_id = getattr(record, "trace_id", None)
    if trace_id:
        span_id = getattr(record, "span_id", None)
        return {"trace_id": trace_id, "span_id": span_id} if span_id else {"trace_id": trace_id}
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}
    return {}


class JsonFormatter(logging.Formatter):
    """One JSON object a line."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._redact = Redactor(secrets)

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_trace_fields(record))
        for name in LOG_FIELDS:
            if name not in line:
                value = getattr(record, name, None)
                if value is not None:
                    line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return self._redact(json.dumps(line, default=str, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...` for people at a terminal."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self._redact = Redactor(secrets)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _trace_fields(record)
        for name in LOG_FIELDS:
            if name not in fields:
                value = getattr(record, name, None)
                if value is not None:
                    fields[name] = value
        if fields:
            pairs = " ".join(f"{k}={v}" for k, v in fields.items() if k != "span_id")
            first, nl, rest = text.partition("\n")
            text = f"{first} [{pairs}]{nl}{rest}"
        return self._redact(text)


def logging_config(settings: Settings) -> dict[str, Any]:
    """A dictConfig for the worker: one stdout handler with the configured formatter."""
    formatter = JsonFormatter if settings.log_format == "json" else TextFormatter
    library_level = max(logging.getLevelName(settings.log_level), logging.INFO)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "guardstream": {"()": formatter, "secrets": secret_values(settings)},
        },
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stdout",
                "formatter": "guardstream",
                "level": settings.log_level,
            },
        },
        "loggers": {
            name: {"level": logging.getLevelName(library_level)} for name in _QUIET_LIBRARIES
        },
        "root": {"level": settings.log_level, "handlers": ["stdout"]},
    }


def configure_logging(settings: Settings) -> dict[str, Any]:
    """Apply `logging_config(settings)` now; return a fresh copy for Faust's Worker to apply
    again (dictConfig consumes the dict it is given)."""
    import logging.config

    logging.config.dictConfig(logging_config(settings))
    return logging_config(settings)
