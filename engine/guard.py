"""`Guard`: prompt builder, cache, batcher, backend and parser tied together.

    guard = Guard(backend, cache=cache, max_batch_size=32, max_wait_ms=20)
    await guard.start()
    result = await guard.moderate(ModerationRequest(prompt="...", response=None))

Two stages. With a cache, requests are first looked up in batches of their own (one `MGET` round
trip for the keys of `LOOKUP_WAIT_MS`): a hit is answered there and never takes a place in a
model batch or one of the `max_in_flight` model slots, which only misses fill. A miss whose key
is already being generated joins that generation instead of starting another. The model batches
deduplicate identical requests (by cache key) and go to the backend with a timeout and bounded
retries; their trusted verdicts are stored in the cache (an untrusted one, `Verdict.trusted`, is
generated again next time rather than served for the cache's TTL). An engine failure never
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
from engine.batcher import BatcherClosed, MicroBatcher
from engine.cache import VerdictCache, cache_key
from engine.parser import CONFLICT_RULE, PARSER_VERSION, parse
from engine.prompt import TEMPLATE_VERSION, build_model_input, user_texts
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


#: A lookup's answer for one key: the cached verdict (or None), when its batch started, its size.
_Looked = tuple[Verdict | None, float, int]

#: Cache lookup batches: one starts this long after its first key (or when full), and this many
#: MGET round trips run at once. Coalescing the keys of a few ms into one round trip is what keeps
#: the cache's CPU cost per message small (a round trip per few messages cost ~100 us each); the
#: second slot keeps lookups going while a slow Redis runs one into its timeout.
LOOKUP_WAIT_MS = 2.0
LOOKUP_IN_FLIGHT = 2


def _chain(
    source: asyncio.Future[ModerationResult], target: asyncio.Future[ModerationResult]
) -> None:
    """Settle `target` as `source` settles."""

    def settle(done: asyncio.Future[ModerationResult]) -> None:
        if target.done():
            return
        if done.cancelled():
            target.set_exception(BatcherClosed("the request it joined was cancelled"))
        elif (exc := done.exception()) is not None:
            target.set_exception(exc)
        else:
            target.set_result(done.result())

    source.add_done_callback(settle)


def _join_parents(first: _Pending, duplicate: _Pending) -> None:
    if duplicate.parents:
        first.parents = (first.parents or []) + duplicate.parents


@dataclass(slots=True)
class GuardStats:
    requests: int = 0
    cache_hits: int = 0
    generated: int = 0
    engine_errors: int = 0
    joined: int = 0  # misses that joined a generation of the same key already under way
    lookups: int = 0  # cache lookup batches
    batches: int = 0  # model batches
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
        self._lookups: MicroBatcher[_Pending, _Looked] | None = None
        if cache is not None:
            self._lookups = MicroBatcher(
                self._lookup,
                max_batch_size=max(4 * max_batch_size, 64),
                max_wait_ms=LOOKUP_WAIT_MS,
                max_in_flight=LOOKUP_IN_FLIGHT,
                key=lambda p: p.key,
                name="guard-cache",
                on_duplicate=_join_parents if tracer is not None else None,
            )
        # Requests between `submit` and their result. Hits leave within a round trip, so this
        # bounds the misses waiting for the model: enough to fill every model slot twice over.
        self._admission = asyncio.Semaphore(2 * max_batch_size * (max_in_flight + 1))
        #: Everything besides the model and the texts that changes a verdict: part of its key.
        self.variant = (
            f"parser={PARSER_VERSION};conflicts={CONFLICT_RULE};max_new_tokens={max_new_tokens};"
            f"max_text_chars={max_text_chars}"
        )
        self._generating: dict[str, asyncio.Future[ModerationResult]] = {}
        self._forwarding: set[asyncio.Task[None]] = set()

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
        if self._lookups is not None:
            await self._lookups.close(drain=drain, timeout=timeout)
        if self._forwarding:
            if not drain:
                for task in self._forwarding:
                    task.cancel()
            await asyncio.wait(list(self._forwarding), timeout=timeout)
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
            variant=self.variant,
        )

    async def submit(self, request: ModerationRequest) -> asyncio.Future[ModerationResult]:
        """Queue a request; waits only while the engine is full (backpressure)."""
        self.stats.requests += 1
        pending = _Pending(request, self.key_for(request))
        if self._tracing is not None:
            parent = current_parent()
            pending.parents = [parent] if parent is not None else None
        if self._lookups is None:
            return await self._batcher.submit(pending)
        await self._admission.acquire()
        try:
            looked = await self._lookups.submit(pending)
        except BaseException:
            self._admission.release()
            raise
        result: asyncio.Future[ModerationResult] = asyncio.get_running_loop().create_future()
        result.add_done_callback(lambda _: self._settled(pending.key, result))
        looked.add_done_callback(lambda done: self._looked(pending, done, result))
        return result

    def _settled(self, key: str, result: asyncio.Future[ModerationResult]) -> None:
        self._admission.release()
        if self._generating.get(key) is result:
            del self._generating[key]

    # --- stage one: cache lookups ------------------------------------------------------------

    async def _lookup(self, items: list[_Pending]) -> list[_Looked]:
        assert self.cache is not None
        started = time.monotonic()
        self.stats.lookups += 1
        found = await self.cache.get_many([p.key for p in items])
        if self._tracing is not None:
            bt = self._tracing.lookup([p.parents or [] for p in items], started)
            bt.cache_lookup(started, time.monotonic(), [v is not None for v in found])
            bt.end()
        return [(verdict, started, len(items)) for verdict in found]

    def _looked(
        self,
        pending: _Pending,
        looked: asyncio.Future[_Looked],
        result: asyncio.Future[ModerationResult],
    ) -> None:
        if result.done():  # the caller gave up
            return
        if looked.cancelled():
            result.set_exception(BatcherClosed("the cache lookup was cancelled"))
            return
        if (exc := looked.exception()) is not None:
            result.set_exception(exc)
            return
        hit, started, size = looked.result()
        if hit is not None:
            self.stats.cache_hits += 1
            wait_ms = (started - pending.enqueued) * 1000
            result.set_result(ModerationResult(hit, True, pending.key, size, wait_ms))
            return
        under_way = self._generating.get(pending.key)
        if under_way is not None:
            self.stats.joined += 1
            _chain(under_way, result)
            return
        self._generating[pending.key] = result
        try:
            queued = self._batcher.submit_nowait(pending, result)
        except BatcherClosed as closed:
            result.set_exception(closed)
            return
        if queued is not None:  # the batcher settles `result` itself
            return
        task = asyncio.get_running_loop().create_task(self._forward(pending, result))
        self._forwarding.add(task)
        task.add_done_callback(self._forwarding.discard)

    async def _forward(self, pending: _Pending, result: asyncio.Future[ModerationResult]) -> None:
        """A miss that found the model batches full: wait for room (the backpressure)."""
        try:
            await self._batcher.submit(pending, result)
        except asyncio.CancelledError:
            if not result.done():
                result.set_exception(BatcherClosed("guard closed before this request was queued"))
            raise
        except Exception as exc:  # noqa: BLE001 - BatcherClosed, handed to the caller
            if not result.done():
                result.set_exception(exc)

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
        # Every item is a miss: with a cache, hits were answered by the lookup stage.
        texts = [
            user_texts(p.request.prompt, p.request.response, max_chars=self.max_text_chars)
            for p in items
        ]
        inputs = [build_model_input(prompt, response) for prompt, response in texts]
        t0 = time.monotonic()
        generations = await self._generate(inputs)
        generate_ms = (time.monotonic() - t0) * 1000
        if bt is not None:
            bt.generate(t0, t0 + generate_ms / 1000, [g.tokens for g in generations])
        results: list[ModerationResult] = []
        to_store: list[tuple[str, Verdict]] = []
        for p, wait_ms, gen, quoted in zip(items, waits, generations, texts, strict=True):
            verdict = self._verdict(gen, p.request.response is not None, quoted)
            if verdict.trusted:  # an untrusted verdict is never served again: it is redone
                to_store.append((p.key, verdict))
            results.append(
                ModerationResult(
                    verdict, False, p.key, len(items), wait_ms, generate_ms, gen.tokens
                )
            )
        if self.cache is not None and to_store:
            t_store = time.monotonic()
            await self.cache.set_many(to_store)
            if bt is not None:
                bt.cache_store(t_store, time.monotonic(), len(to_store))
        if self._on_batch is not None:
            self._on_batch(len(items), waits, generate_ms)
        return results

    def _verdict(
        self, gen: Generation, has_response: bool, quoted: tuple[str, str | None]
    ) -> Verdict:
        if gen.finish_reason == "error":
            self.stats.engine_errors += 1
            return Verdict(engine_error=gen.error or "engine error", raw=gen.text)
        self.stats.generated += 1
        self.stats.tokens += gen.tokens or 0
        verdict = parse(gen.text, has_response=has_response, quoted=quoted)
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
