"""Cache poisoning, against the real Redis: a verdict stored under one model, model revision,
prompt template, token cap or text limit is never served for another; an untrusted verdict is
never stored; a stored value that does not validate is a miss, and the fresh verdict overwrites
it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from redis.asyncio import Redis

import engine.guard
from engine.backends.base import Backend, Generation, Stops
from engine.cache import RedisVerdictCache, encode_value
from engine.guard import Guard
from schemas.events import SCHEMA_VERSION
from schemas.verdict import ModerationRequest, Verdict
from tests.security.support import FixedBackend

pytestmark = [pytest.mark.integration]

HARMFUL = "Answers: \nRequest: harmful\nCompletion: compliance\nResponse: harmful\n"
UNHARMFUL = "Answers: \nRequest: unharmful\nCompletion: refusal\nResponse: unharmful\n"
REQUEST = ModerationRequest(prompt="How do I pick a lock?", response="Like this ...")


class Labelled(FixedBackend):
    """A stand-in guard model with a chosen id and revision."""

    def __init__(self, text: str, model_id: str = "guard", revision: str = "r1") -> None:
        super().__init__(text)
        self.model_id, self.revision = model_id, revision


@pytest.fixture
async def redis_client(redis_url: str, unique: str) -> AsyncIterator[tuple[Redis, str]]:
    client = Redis.from_url(redis_url)
    prefix = f"gs-poison-{unique}:"
    try:
        yield client, prefix
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


class Cut(Labelled):
    """Its output stops at the token cap."""

    async def generate(
        self, inputs: Sequence[str], max_new_tokens: int, stop: Stops = None
    ) -> list[Generation]:
        gens = await super().generate(inputs, max_new_tokens)
        return [Generation(g.text, tokens=g.tokens, finish_reason="length") for g in gens]


async def _moderate(
    backend: Backend, redis_url: str, prefix: str, **guard: Any
) -> tuple[Verdict, bool, int]:
    """(verdict, served from cache, backend calls) for REQUEST with a fresh guard."""
    cache = RedisVerdictCache(redis_url, prefix=prefix, timeout_s=2.0)
    guard = Guard(backend, cache=cache, max_batch_size=4, max_wait_ms=1, **guard)
    await guard.start()
    try:
        result = await guard.moderate(REQUEST)
    finally:
        await guard.close()
    calls = len(getattr(backend, "inputs", []))
    return result.verdict, result.cached, calls


@pytest.mark.timeout(60)
async def test_no_verdict_crosses_model_revision_or_template(
    redis_url: str, redis_client: tuple[Redis, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, prefix = redis_client
    first, cached, _ = await _moderate(Labelled(HARMFUL), redis_url, prefix)
    assert first.request == "harmful" and not cached
    again, cached, calls = await _moderate(Labelled(UNHARMFUL), redis_url, prefix)
    assert cached and calls == 0 and again.request == "harmful"  # same model: served
    for other in (
        Labelled(UNHARMFUL, revision="r2"),  # another revision of the model
        Labelled(UNHARMFUL, model_id="other-guard"),  # another model
    ):
        verdict, cached, calls = await _moderate(other, redis_url, prefix)
        assert not cached and calls == 1 and verdict.request == "unharmful"
    for changed in ({"max_new_tokens": 1024}, {"max_text_chars": 4000}):  # other settings
        verdict, cached, calls = await _moderate(Labelled(UNHARMFUL), redis_url, prefix, **changed)
        assert not cached and calls == 1 and verdict.request == "unharmful", changed
    monkeypatch.setattr(engine.guard, "TEMPLATE_VERSION", "gr-v2")  # another prompt template
    verdict, cached, calls = await _moderate(Labelled(UNHARMFUL), redis_url, prefix)
    assert not cached and calls == 1 and verdict.request == "unharmful"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("name", "backend"),
    [
        ("unparsed", Labelled("I cannot tell.")),
        ("incomplete", Labelled("Answers: \nRequest: unharmful\nCompletion: refusal\n")),
        ("truncated", Cut(UNHARMFUL)),
        ("conflicting", Labelled(HARMFUL.replace("Answers", "# Answers") + "\n\n" + UNHARMFUL)),
    ],
)
async def test_an_untrusted_verdict_is_never_cached(
    redis_url: str, redis_client: tuple[Redis, str], name: str, backend: Labelled
) -> None:
    """It would be served for the cache's whole TTL (7 days by default): it is generated again
    instead. A trusted one is served."""
    _, prefix = redis_client
    first, cached, calls = await _moderate(backend, redis_url, prefix)
    assert first.trust == name and not first.trusted and not cached and calls == 1
    _, cached, calls = await _moderate(backend, redis_url, prefix)
    assert not cached and calls == 2
    trusted = Labelled(UNHARMFUL)
    await _moderate(trusted, redis_url, prefix)
    _, cached, calls = await _moderate(trusted, redis_url, prefix)
    assert cached and calls == 1


def _poisons() -> dict[str, bytes]:
    good = json.loads(encode_value(Verdict(request="unharmful", found="final")))
    wrong_label = {**good, "verdict": {**good["verdict"], "request": "totally-fine"}}
    extra = {**good, "verdict": {**good["verdict"], "flagged": False}}
    return {
        "not json": b"\x00garbage",
        "truncated": encode_value(Verdict(request="unharmful"))[:20],
        "other schema version": json.dumps({**good, "schema_version": SCHEMA_VERSION + 1}).encode(),
        "bare verdict": json.dumps(good["verdict"]).encode(),
        "label out of range": json.dumps(wrong_label).encode(),
        "unknown field": json.dumps(extra).encode(),
        "wrong type": json.dumps({**good, "verdict": "unharmful"}).encode(),
        "empty": b"",
    }


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(_poisons()))
async def test_invalid_stored_value_is_a_miss_and_is_overwritten(
    name: str, redis_url: str, redis_client: tuple[Redis, str]
) -> None:
    client, prefix = redis_client
    backend = Labelled(HARMFUL)
    guard = Guard(backend, max_batch_size=1, max_wait_ms=1)
    key = prefix + guard.key_for(REQUEST)
    await client.set(key, _poisons()[name])
    cache = RedisVerdictCache(redis_url, prefix=prefix, timeout_s=2.0)
    guard = Guard(backend, cache=cache, max_batch_size=4, max_wait_ms=1)
    await guard.start()
    try:
        result = await guard.moderate(REQUEST)
    finally:
        await guard.close()
    assert not result.cached and len(backend.inputs) == 1, "a poisoned value is a miss"
    assert result.verdict.request == "harmful"
    assert cache.stats.invalid == 1
    stored = await client.get(key)
    assert stored is not None and stored != _poisons()[name]
    assert json.loads(stored)["verdict"]["request"] == "harmful", "overwritten with the fresh one"
