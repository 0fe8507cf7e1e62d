"""Verdict caches: the key, the protocol, an in-process LRU, and the Redis cache.

`RedisVerdictCache` (in `engine.cache_redis`) is the service's cache; `MemoryVerdictCache` is
for embedded use (the CLI, tests, a single process without Redis). Both store `Verdict`s under
`cache_key(...)` keys and never raise for backend trouble: a cache that cannot answer misses.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from engine.cache_base import (
    CacheState,
    CacheStats,
    VerdictCache,
    cache_key,
    decode_value,
    encode_value,
)
from engine.cache_redis import CircuitBreaker, RedisVerdictCache, mask_url
from schemas.verdict import Verdict

__all__ = [
    "CacheState",
    "CacheStats",
    "CircuitBreaker",
    "MemoryVerdictCache",
    "RedisVerdictCache",
    "VerdictCache",
    "cache_key",
    "decode_value",
    "encode_value",
    "mask_url",
]


class MemoryVerdictCache:
    """An in-process LRU of at most `max_entries` verdicts (no TTL)."""

    def __init__(self, max_entries: int = 10_000) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.stats = CacheStats()
        self._entries: OrderedDict[str, Verdict] = OrderedDict()

    @property
    def available(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._entries)

    async def get_many(self, keys: Sequence[str]) -> list[Verdict | None]:
        found: list[Verdict | None] = []
        for key in keys:
            verdict = self._entries.get(key)
            if verdict is None:
                self.stats.misses += 1
            else:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                # A copy: a caller mutating its verdict must not change the cached one.
                verdict = verdict.model_copy(deep=True)
            found.append(verdict)
        return found

    async def set_many(self, items: Sequence[tuple[str, Verdict]]) -> None:
        for key, verdict in items:
            self._entries[key] = verdict.model_copy(deep=True)
            self._entries.move_to_end(key)
            self.stats.writes += 1
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.stats.evictions += 1

    async def close(self) -> None:
        self._entries.clear()
