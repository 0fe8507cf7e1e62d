"""The Redis verdict cache, and the circuit breaker that keeps a sick Redis off the hot path.

Moderation never waits long on Redis and never fails because of it: every call is bounded by
`timeout_s` (asyncio deadline plus socket timeouts, no client-side retries), errors become
misses or dropped writes, and after `failure_threshold` consecutive failures the breaker opens:
calls are skipped at once for `reset_after_s`, then a single probe call decides (success closes
the breaker, failure opens it again). State changes are logged once each, on the logger
`guardstream.cache`, and reported to `on_state_change`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from engine.cache_base import CacheState, CacheStats, decode_value, encode_value
from schemas.verdict import Verdict

logger = logging.getLogger("guardstream.cache")

StateHook = Callable[[CacheState], None]


def mask_url(url: str) -> str:
    """`url` fit for logs: the password replaced by `***`, the query string dropped."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if user else f":***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class CircuitBreaker:
    """Consecutive-failure breaker: closed -> open (after `failure_threshold` failures) ->
    half_open (after `reset_after_s`, one probe call) -> closed on success, open on failure."""

    def __init__(
        self,
        *,
        failure_threshold: int,
        reset_after_s: float,
        name: str,
        on_change: StateHook | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self.name = name
        self._on_change = on_change
        self._clock = clock
        self.state: CacheState = "closed"
        self.failures = 0  # consecutive
        self._opened_at = 0.0
        self._probing = False

    def allow(self) -> bool:
        """May a call go to the backend now? (In half_open, only the one probe may.)"""
        if self.state == "closed":
            return True
        if self.state == "open":
            if self._clock() - self._opened_at < self.reset_after_s:
                return False
            self._set("half_open", None)
        if self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self._probing = False
        self.failures = 0
        if self.state != "closed":
            self._set("closed", None)

    def failure(self, reason: str) -> None:
        self._probing = False
        self.failures += 1
        if self.state == "half_open" or (
            self.state == "closed" and self.failures >= self.failure_threshold
        ):
            self._opened_at = self._clock()
            self._set("open", reason)

    def abandon(self) -> None:
        """A call ended without an answer either way (its caller was cancelled)."""
        self._probing = False

    def _set(self, state: CacheState, reason: str | None) -> None:
        self.state = state
        if state == "open":
            logger.warning(
                "%s unavailable after %d consecutive failures (last: %s); skipping it for %.1fs",
                self.name,
                self.failures,
                reason,
                self.reset_after_s,
            )
        elif state == "half_open":
            logger.info("%s: probing", self.name)
        else:
            logger.warning("%s available again", self.name)
        if self._on_change is not None:
            try:
                self._on_change(state)
            except Exception:
                logger.exception("%s: on_state_change hook failed", self.name)


class RedisVerdictCache:
    """Verdicts in Redis: one `MGET` per `get_many`, one pipelined round trip of
    `SET key value EX ttl_s` per `set_many`; values are JSON with a `schema_version`.

    `url` is handed to `redis.asyncio.Redis.from_url` (`redis://`, `rediss://` for TLS,
    credentials in the URL). A `client` given instead is used as is (its timeouts and retries
    are the caller's) and not closed by `close()`.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl_s: int = 86400,
        timeout_s: float = 0.2,
        prefix: str = "guardstream:verdict:",
        failure_threshold: int = 3,
        reset_after_s: float = 5.0,
        client: Redis | None = None,
        on_state_change: StateHook | None = None,
    ) -> None:
        if ttl_s < 1:
            raise ValueError(f"ttl_s must be >= 1 second, got {ttl_s}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.url = mask_url(url)
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.prefix = prefix
        self.stats = CacheStats()
        self._on_state_change = on_state_change
        self._owns_client = client is None
        self._client: Redis = (
            client
            if client is not None
            else Redis.from_url(
                url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                # One retry, at once and on a fresh connection, when the connection itself
                # failed: after Redis restarts, every pooled connection is dead and the first
                # command on each fails (one write batch lost per connection, and the breaker
                # opened, on every Redis restart). A timeout is not retried: a frozen Redis
                # stays a quick miss, and the breaker decides when to try it again.
                retry=Retry(NoBackoff(), 1),
                retry_on_error=[RedisConnectionError],
            )
        )
        self._breaker = CircuitBreaker(
            failure_threshold=failure_threshold,
            reset_after_s=reset_after_s,
            name=f"redis verdict cache at {self.url}",
            on_change=self._state_changed,
        )

    @property
    def available(self) -> bool:
        return self._breaker.state == "closed"

    @property
    def state(self) -> CacheState:
        return self._breaker.state

    async def get_many(self, keys: Sequence[str]) -> list[Verdict | None]:
        """One verdict or None per key; one `MGET` round trip; never raises for Redis trouble."""
        misses: list[Verdict | None] = [None] * len(keys)
        if not keys:
            return misses
        if not self._breaker.allow():
            self.stats.skipped_while_open += 1
            self.stats.misses += len(keys)
            return misses
        try:
            async with asyncio.timeout(self.timeout_s):
                raw = await self._client.mget([self.prefix + key for key in keys])
            if not isinstance(raw, list) or len(raw) != len(keys):
                raise TypeError(f"MGET answered {type(raw).__name__} for {len(keys)} keys")
        except Exception as exc:  # noqa: BLE001 - by design, Redis trouble is only a miss
            self._failed("MGET", exc)
            self.stats.misses += len(keys)
            return misses
        except BaseException:
            self._breaker.abandon()
            raise
        self._breaker.success()
        found: list[Verdict | None] = []
        for value in raw:
            verdict = None if value is None else decode_value(value)
            if verdict is None:
                self.stats.misses += 1
                self.stats.invalid += value is not None
            else:
                self.stats.hits += 1
            found.append(verdict)
        return found

    async def set_many(self, items: Sequence[tuple[str, Verdict]]) -> None:
        """Store the verdicts with `EX ttl_s`, pipelined (one round trip); drops them, without
        raising, when Redis fails or the breaker is open."""
        if not items:
            return
        if not self._breaker.allow():
            self.stats.skipped_while_open += 1
            self.stats.dropped_writes += len(items)
            return
        values = [(self.prefix + key, encode_value(verdict)) for key, verdict in items]
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._client.pipeline(transaction=False) as pipe:
                    for key, value in values:
                        pipe.set(key, value, ex=self.ttl_s)
                    await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - by design, a failed write is only dropped
            self._failed("SET pipeline", exc)
            self.stats.dropped_writes += len(items)
            return
        except BaseException:
            self._breaker.abandon()
            raise
        self._breaker.success()
        self.stats.writes += len(items)

    async def ping(self) -> bool:
        """One `PING` through the breaker, so that its state follows Redis while no traffic
        does (readiness and the degraded gauge rely on it). True when Redis answered."""
        if not self._breaker.allow():
            return False
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._client.ping()
        except Exception as exc:  # noqa: BLE001 - a failed probe is only a failure
            self._failed("PING", exc)
            return False
        except BaseException:
            self._breaker.abandon()
            raise
        self._breaker.success()
        return True

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    def _failed(self, what: str, exc: Exception) -> None:
        self.stats.errors += 1
        if isinstance(exc, TimeoutError):
            reason = f"{what}: no answer within {self.timeout_s}s"
        else:
            reason = f"{what}: {type(exc).__name__}: {exc}"
        logger.debug("redis verdict cache at %s: %s", self.url, reason)
        self._breaker.failure(reason)

    def _state_changed(self, state: CacheState) -> None:
        self.stats.state = state
        if self._on_state_change is not None:
            self._on_state_change(state)
