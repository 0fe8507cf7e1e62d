"""Kafka connection details from settings: Faust credentials, aiokafka kwargs, topic set-up."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import faust
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from service.config import Settings

log = logging.getLogger("guardstream.kafka")

_DESCRIBE_ATTEMPTS = 150  # 30 s in all
_DESCRIBE_PAUSE_S = 0.2


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.kafka_security_protocol.endswith("SSL"):
        return None
    ctx = ssl.create_default_context(
        cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
    )
    if settings.kafka_ssl_certfile:
        ctx.load_cert_chain(
            str(settings.kafka_ssl_certfile),
            str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None,
        )
    return ctx


def faust_credentials(settings: Settings) -> Any:
    """SASL (PLAIN, SCRAM) and/or TLS for Faust's `broker_credentials`, or None."""
    ctx = ssl_context(settings)
    if settings.kafka_security_protocol.startswith("SASL"):
        password = settings.kafka_sasl_password
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=password.get_secret_value() if password else None,
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=ctx,
        )
    if ctx is not None:
        return faust.SSLCredentials(ctx)
    return None


def client_kwargs(settings: Settings) -> dict[str, Any]:
    """The same connection settings for a plain aiokafka client (admin, tests, benchmarks)."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
    }
    ctx = ssl_context(settings)
    if ctx is not None:
        kwargs["ssl_context"] = ctx
    if settings.kafka_security_protocol.startswith("SASL"):
        password = settings.kafka_sasl_password
        kwargs.update(
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=password.get_secret_value() if password else None,
        )
    return kwargs


async def ensure_topics(settings: Settings) -> int:
    """Create the five topics when missing; return the input topics' partition count.

    Prompts and responses must have the same count (pairing reads a response on the worker that
    holds its prompt); a mismatch is a configuration error.
    """
    names = [
        settings.topic_prompts,
        settings.topic_responses,
        settings.topic_verdicts,
        settings.topic_flagged,
        settings.topic_dlq,
    ]
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in names if n not in existing]
        if missing:
            log.info("creating topics %s with %d partitions", missing, settings.topic_partitions)
            await admin.create_topics(
                [
                    NewTopic(n, settings.topic_partitions, settings.topic_replication_factor)
                    for n in missing
                ]
            )
        # Right after CreateTopics the broker may still describe a new topic as unknown, with no
        # partitions: ask again until both input topics have theirs.
        inputs = [settings.topic_prompts, settings.topic_responses]
        for _ in range(_DESCRIBE_ATTEMPTS):
            described = await admin.describe_topics(inputs)
            counts = {d["topic"]: len(d["partitions"]) for d in described}
            if all(counts.get(n) for n in inputs):
                break
            await asyncio.sleep(_DESCRIBE_PAUSE_S)
        else:
            raise RuntimeError(f"topics {inputs} still have no partitions: {counts}")
    finally:
        await admin.close()
    prompts, responses = counts[settings.topic_prompts], counts[settings.topic_responses]
    if prompts != responses:
        raise RuntimeError(
            f"topics {settings.topic_prompts} ({prompts} partitions) and "
            f"{settings.topic_responses} ({responses}) must have the same partition count"
        )
    return prompts
