"""What every verdict cache shares: the key, the stored value's format, the protocol, stats.

Import from `engine.cache`; this module exists so that the Redis implementation
(`engine.cache_redis`) and the facade can both use it without importing each other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from schemas.events import SCHEMA_VERSION
from schemas.verdict import Verdict

CacheState = Literal["closed", "open", "half_open"]

#: Version of the key derivation below; bump it to orphan every existing entry.
KEY_VERSION = "v2"


def _frame(part: str | None) -> bytes:
    """Prefix-free encoding of one part: `N` for None, else `S<byte length>:<utf-8 bytes>`."""
    if part is None:
        return b"N"
    data = part.encode("utf-8", "surrogatepass")
    return b"S%d:%s" % (len(data), data)


def cache_key(
    model_id: str,
    revision: str,
    template_version: str,
    prompt: str,
    response: str | None,
    *,
    variant: str = "",
) -> str:
    """The cache key of one moderation request: `gs:v2:<sha256 hex>`.

    The digest covers the model id, its revision, the prompt template's version, both texts and
    `variant` (everything else that changes the output or its reading: the parser's version,
    the token cap, the text limit, early exit; `engine.guard.Guard.variant`), each
    length-prefixed, so no two different tuples share an input (("ab", "c") and ("a", "bc")
    differ, as do a missing response and an empty one), and a verdict of one model revision,
    template or setting is never served for another.
    """
    parts = (model_id, revision, template_version, prompt, response, variant)
    material = b"".join(_frame(p) for p in parts)
    return f"gs:{KEY_VERSION}:{hashlib.sha256(material).hexdigest()}"


class _Envelope(BaseModel):
    """The stored value: the verdict wrapped with the schema version it was written under."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int
    verdict: Verdict


def encode_value(verdict: Verdict) -> bytes:
    """The stored form of a verdict (JSON, carrying `schema_version`)."""
    return _Envelope(schema_version=SCHEMA_VERSION, verdict=verdict).model_dump_json().encode()


def decode_value(raw: bytes | str) -> Verdict | None:
    """The verdict in a stored value, or None when it is not valid JSON of this schema version
    (an older or newer writer, or garbage): the caller treats that as a miss and overwrites it."""
    try:
        envelope = _Envelope.model_validate_json(raw)
    except ValidationError:
        return None
    if envelope.schema_version != SCHEMA_VERSION:
        return None
    return envelope.verdict


@dataclass
class CacheStats:
    """Counters of one cache (read them, don't write them).

    `misses` counts every key answered with None, including keys of calls that failed or were
    skipped while the breaker was open (so hits / (hits + misses) is the effective hit rate);
    `errors` and `skipped_while_open` count calls, `invalid` counts stored values that failed
    to decode.
    """

    hits: int = 0
    misses: int = 0
    errors: int = 0
    invalid: int = 0
    skipped_while_open: int = 0
    writes: int = 0  # entries written
    dropped_writes: int = 0  # entries not written because the backend failed or was skipped
    evictions: int = 0  # entries evicted by an in-process LRU
    state: CacheState = "closed"


class VerdictCache(Protocol):
    """A verdict cache: batched reads and writes that never raise for backend trouble."""

    stats: CacheStats

    async def get_many(self, keys: Sequence[str]) -> list[Verdict | None]:
        """One verdict or None per key, in order."""
        ...

    async def set_many(self, items: Sequence[tuple[str, Verdict]]) -> None:
        """Store the verdicts (best effort)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...

    @property
    def available(self) -> bool:
        """False while the cache is degraded (its backend is failing)."""
        ...
