"""`Guard`: prompt builder, cache, batcher, backend and parser tied together.

    guard = Guard(backend, cache=cache, max_batch_size=32, max_wait_ms=20)
    await guard.start()
    result = await guard.moderate(ModerationRequest(prompt="...", response=None))

Per batch: one cache round trip for all keys, identical requests deduplicated (by cache key),
only the misses sent to the backend, with a timeout and bounded retries. An engine failure never
raises out of the guard: the request gets a verdict with `engine_error` set and no labels, and
the caller applies its failure policy. A batch that keeps failing is split so that one poison
input cannot take its neighbours down with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from opentelemetry.trace import Tracer

from engine.backends.base import Backend, Generation
from engine.batcher import MicroBatcher
from engine.cache import VerdictCache, cache_key
from engine.parser import parse
from engine.prompt import TEMPLATE_VERSION, build_model_input
from engine.tracing import BatchTrace, BatchTracer, Parent, current_parent
from schemas.verdict import ModerationRequest, Verdict

log = logging.getLogger("guardstream.guard")


@dataclass(frozen=True, slots=True)
class ModerationResult:
    """A verdict and how it was obtained."""

    verdict: Verdict
    cached: bool
    key: str
    batch_size: int = 0
    batch_wait_ms: float = 0.0
    generate_ms: float = 0.0
    tokens: int | None = None


@dataclass(slots=True)
class _Pending:
    request: ModerationRequest
    key: str
    enqueued: float = field(default_factory=time.monotonic)
    parents: list[Parent] | None = None  # callers' span contexts, only when tracing


def _join_parents(first: _Pending, duplicate: _Pending) -> None:
    if duplicate.parents:
        first.parents = (first.parents or []) + duplicate.parents


@dataclass(slots=True)
class GuardStats:
    requests: int = 0
    cache_hits: int = 0
    generated: int = 0
    engine_errors: int = 0
    batches: int = 0
    tokens: int = 0  # generated tokens, as the backend counted them


BatchHook = Callable[[int, Sequence[float], float], None]


class Guard:
    def __init__(
        self,
        backend: Backend,
        *,
        cache: VerdictCache | None = None,
        max_batch_size: int = 32,
        max_wait_ms: float = 20.0,
        max_in_flight: int = 2,
        max_new_tokens: int = 2048,
        max_text_chars: int | None = None,
        retries: int = 2,
        retry_backoff_s: float = 0.2,
        timeout_s: float = 120.0,
        on_batch: BatchHook | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.backend = backend
        self.cache = cache
        self.max_new_tokens = max_new_tokens
        self.max_text_chars = max_text_chars
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.timeout_s = timeout_s
        self.stats = GuardStats()
        self._on_batch = on_batch
        self._tracing = BatchTracer(tracer) if tracer is not None else None
        self._batcher: MicroBatcher[_Pending, ModerationResult] = MicroBatcher(
            self._process,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_in_flight=max_in_flight,
            key=lambda p: p.key,
            name="guard",
            on_duplicate=_join_parents if tracer is not None else None,
        )

    @property
    def model_id(self) -> str:
        return self.backend.model_id

    @property
    def revision(self) -> str:
        return self.backend.revision

    @property
    def batches_in_flight(self) -> int:
        return self._batcher.stats.in_flight

    async def start(self) -> None:
        await self.backend.start()

    async def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        await self._batcher.close(drain=drain, timeout=timeout)
        await self.backend.close()
        if self.cache is not None:
            await self.cache.close()

    def key_for(self, request: ModerationRequest) -> str:
        return cache_key(
            self.backend.model_id,
            self.backend.revision,
            TEMPLATE_VERSION,
            request.prompt,
            request.response,
        )

    async def submit(self, request: ModerationRequest) -> asyncio.Future[ModerationResult]:
        """Queue a request; waits only while the engine is full (backpressure)."""
        self.stats.requests += 1
        pending = _Pending(request, self.key_for(request))
        if self._tracing is not None:
            parent = current_parent()
            pending.parents = [parent] if parent is not None else None
        return await self._batcher.submit(pending)

    async def moderate(self, request: ModerationRequest) -> ModerationResult:
        return await (await self.submit(request))

    # --- one batch ---------------------------------------------------------------------------

    async def _process(self, items: list[_Pending]) -> list[ModerationResult]:
        started = time.monotonic()
        if self._tracing is None:
            return await self._process_batch(items, started, None)
        bt = self._tracing.start([p.parents or [] for p in items], started)
        try:
            results = await self._process_batch(items, started, bt)
        except BaseException as exc:
            bt.end(exc)
            raise
        bt.end()
        return results

    async def _process_batch(
        self, items: list[_Pending], started: float, bt: BatchTrace | None
    ) -> list[ModerationResult]:
        waits = [(started - p.enqueued) * 1000 for p in items]
        self.stats.batches += 1
        # `is not None`: an empty MemoryVerdictCache is falsy (it has a __len__)
        cache = self.cache
        cached = await cache.get_many([p.key for p in items]) if cache is not None else []
        if bt is not None and cache is not None:
            bt.cache_lookup(started, time.monotonic(), [c is not None for c in cached])
        results: list[ModerationResult | None] = [None] * len(items)
        misses: list[int] = []
        for i, p in enumerate(items):
            hit = cached[i] if cached else None
            if hit is not None:
                self.stats.cache_hits += 1
                results[i] = ModerationResult(hit, True, p.key, len(items), waits[i])
            else:
                misses.append(i)
        generate_ms = 0.0
        if misses:
            inputs = [
                build_model_input(
                    items[i].request.prompt,
                    items[i].request.response,
                    max_chars=self.max_text_chars,
                )
                for i in misses
            ]
            t0 = time.monotonic()
            generations = await self._generate(inputs)
            generate_ms = (time.monotonic() - t0) * 1000
            if bt is not None:
                bt.generate(t0, t0 + generate_ms / 1000, misses, [g.tokens for g in generations])
            to_store: list[tuple[str, Verdict]] = []
            for i, gen in zip(misses, generations, strict=True):
                verdict = self._verdict(gen, has_response=items[i].request.response is not None)
                if verdict.engine_error is None:
                    to_store.append((items[i].key, verdict))
                results[i] = ModerationResult(
                    verdict, False, items[i].key, len(items), waits[i], generate_ms, gen.tokens
                )
            if self.cache is not None and to_store:
                t_store = time.monotonic()
                await self.cache.set_many(to_store)
                if bt is not None:
                    bt.cache_store(t_store, time.monotonic(), len(to_store))
        if self._on_batch is not None:
            self._on_batch(len(items), waits, generate_ms)
        return [r for r in results if r is not None]

    def _verdict(self, gen: Generation, *, has_response: bool) -> Verdict:
        if gen.finish_reason == "error":
            self.stats.engine_errors += 1
            return Verdict(engine_error=gen.error or "engine error", raw=gen.text)
        self.stats.generated += 1
        self.stats.tokens += gen.tokens or 0
        verdict = parse(gen.text, has_response=has_response)
        if gen.finish_reason == "length":
            verdict = verdict.model_copy(update={"truncated": True})
        return verdict

    async def _generate(self, inputs: list[str]) -> list[Generation]:
        """Generate with timeout and retries. Inputs that still fail get error Generations; a
        batch that fails as a whole is retried input by input to isolate a poison input."""
        out: list[Generation | None] = [None] * len(inputs)
        pending = list(range(len(inputs)))
        batch_error: str | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            try:
                gens = await self._call([inputs[i] for i in pending])
            except Exception as exc:  # noqa: BLE001 - any engine failure is retried
                batch_error = _describe(exc)
                log.warning(
                    "engine failed on a batch of %d (attempt %d): %s",
                    len(pending),
                    attempt + 1,
                    batch_error,
                )
                continue
            batch_error = None
            still = []
            for i, gen in zip(pending, gens, strict=True):
                out[i] = gen
                if gen.finish_reason == "error":
                    still.append(i)
            pending = still
            if not pending:
                break
        if batch_error is not None and len(pending) > 1:
            singles = await asyncio.gather(
                *(self._call([inputs[i]]) for i in pending), return_exceptions=True
            )
            for i, single in zip(pending, singles, strict=True):
                if isinstance(single, BaseException):
                    out[i] = Generation("", finish_reason="error", error=_describe(single))
                else:
                    out[i] = single[0]
        elif batch_error is not None:
            for i in pending:
                out[i] = Generation("", finish_reason="error", error=batch_error)
        return [g if g is not None else Generation("", finish_reason="error") for g in out]

    async def _call(self, inputs: list[str]) -> list[Generation]:
        async with asyncio.timeout(self.timeout_s):
            gens = await self.backend.generate(inputs, self.max_new_tokens)
        if len(gens) != len(inputs):
            raise RuntimeError(f"backend returned {len(gens)} outputs for {len(inputs)} inputs")
        return gens


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "engine timed out"
    return f"{type(exc).__name__}: {exc}"
