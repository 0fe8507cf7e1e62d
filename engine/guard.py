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
the caller applies its failure policy. Retries, deadlines and the splitting of a batch that
keeps failing (so that one poison input cannot take its neighbours down with it) are
`engine.retry`'s, the one retry policy around every backend.

**Admission.** An in-flight-batching backend (`Backend.batching == "inflight"`: TensorRT-LLM, a
vLLM or trtllm-serve server) schedules every sequence on its own, a finished one freeing its
place at once; a fixed batch sent to it would hold all its places until its longest output
ended. So with `admission="request"` (what `"auto"` picks for such a backend) each miss is a
model call of its own, started as soon as one of `max_sequences` places is free: no request
waits for another's generation. A static-batching backend (`hf`, `replay`) gets micro-batches.

**Early exit.** A prompt-only request (an input guard) is generated with the stop string
`EARLY_EXIT_STOP`: the model writes Task 1, the request's verdict, and stops before reasoning
about a response that does not exist (about 60% of its decode steps). Where the parser cannot
read Task 1 from that prefix, the request is generated again in full (`GuardStats.regenerated`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from opentelemetry.trace import Tracer

from engine.backends.base import Backend, Generation
from engine.batcher import BatcherClosed, MicroBatcher
from engine.cache import VerdictCache, cache_key
from engine.parser import CONFLICT_RULE, PARSER_VERSION, needs_full_output, parse
from engine.prompt import EARLY_EXIT_STOP, TEMPLATE_VERSION, build_model_input, user_texts
from engine.retry import RetryPolicy
from engine.retry import generate as generate_with_retries
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
    early_exits: int = 0  # prompt-only verdicts read from Task 1 alone (generation stopped early)
    regenerated: int = 0  # early-exit outputs whose Task 1 could not be read: generated in full


BatchHook = Callable[[int, Sequence[float], float], None]
Admission = Literal["auto", "batch", "request"]


def admission_mode(admission: Admission, backend: Backend) -> Literal["batch", "request"]:
    """`auto`: per request for an in-flight-batching backend, batches for a static one."""
    if admission == "auto":
        return "request" if backend.batching == "inflight" else "batch"
    return admission


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
        admission: Admission = "auto",
        max_sequences: int = 256,
        early_exit: bool = True,
        on_batch: BatchHook | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        if max_sequences < 1:
            raise ValueError(f"max_sequences: expected >= 1, got {max_sequences}")
        self.backend = backend
        self.cache = cache
        self.max_new_tokens = max_new_tokens
        self.max_text_chars = max_text_chars
        self.retry = RetryPolicy(retries=retries, backoff_s=retry_backoff_s, timeout_s=timeout_s)
        self.early_exit = early_exit
        #: "request": each miss goes to the backend on its own as soon as one of
        #: `max_sequences` places is free (an in-flight engine schedules sequences, not
        #: batches: a batch would hold every place until its longest output ends); "batch":
        #: micro-batches of `max_batch_size`, `max_in_flight` at a time.
        self.admission = admission_mode(admission, backend)
        if self.admission == "request":
            model_batch, model_wait_ms, model_slots = 1, 0.0, max_sequences
        else:
            model_batch, model_wait_ms, model_slots = max_batch_size, max_wait_ms, max_in_flight
        self.stats = GuardStats()
        self._on_batch = on_batch
        self._tracing = BatchTracer(tracer) if tracer is not None else None
        self._batcher: MicroBatcher[_Pending, ModerationResult] = MicroBatcher(
            self._process,
            max_batch_size=model_batch,
            max_wait_ms=model_wait_ms,
            max_in_flight=model_slots,
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
        # bounds the misses waiting for the model: enough to fill every model place twice over.
        self._admission = asyncio.Semaphore(2 * model_batch * (model_slots + 1))
        #: Everything besides the model and the texts that changes a verdict: part of its key.
        #: (Early exit changes a prompt verdict's reasoning, so it is part of it too.)
        self.variant = (
            f"parser={PARSER_VERSION};conflicts={CONFLICT_RULE};max_new_tokens={max_new_tokens};"
            f"max_text_chars={max_text_chars};early_exit={early_exit}"
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
        early = [self.early_exit and p.request.response is None for p in items]
        t0 = time.monotonic()
        generations = await self._generate(inputs, early)
        verdicts = [
            self._verdict(gen, p.request.response is not None, quoted, early_exit=cut)
            for p, gen, quoted, cut in zip(items, generations, texts, early, strict=True)
        ]
        # An early-exit output whose Task 1 cannot be read is generated again in full (greedy:
        # the same Task 1, then the final answer block the parser can read).
        again = [i for i, v in enumerate(verdicts) if needs_full_output(v)]
        if again:
            self.stats.regenerated += len(again)
            full = await self._generate([inputs[i] for i in again], None)
            for i, gen in zip(again, full, strict=True):
                generations[i] = _combined(generations[i], gen)
                verdicts[i] = self._verdict(gen, False, texts[i], early_exit=False)
        generate_ms = (time.monotonic() - t0) * 1000
        self.stats.early_exits += sum(v.early_exit for v in verdicts)
        if bt is not None:
            bt.generate(t0, t0 + generate_ms / 1000, [g.tokens for g in generations])
        results: list[ModerationResult] = []
        to_store: list[tuple[str, Verdict]] = []
        for p, wait_ms, gen, verdict in zip(items, waits, generations, verdicts, strict=True):
            if gen.finish_reason == "error":
                self.stats.engine_errors += 1
            else:
                self.stats.generated += 1
                self.stats.tokens += gen.tokens or 0
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
        self,
        gen: Generation,
        has_response: bool,
        quoted: tuple[str, str | None],
        *,
        early_exit: bool,
    ) -> Verdict:
        if gen.finish_reason == "error":
            return Verdict(engine_error=gen.error or "engine error", raw=gen.text)
        verdict = parse(gen.text, has_response=has_response, quoted=quoted, early_exit=early_exit)
        if gen.finish_reason == "length":
            verdict = verdict.model_copy(update={"truncated": True})
        return verdict

    async def _generate(self, inputs: list[str], early: list[bool] | None) -> list[Generation]:
        """Generate under the retry policy (`engine.retry`); `early[i]`: input i stops at Task
        2. Inputs that still fail get error Generations."""
        stop = [EARLY_EXIT_STOP if cut else None for cut in early] if early else None
        if stop is not None and not any(stop):
            stop = None
        return await generate_with_retries(
            self.backend, inputs, self.max_new_tokens, stop, policy=self.retry
        )


def _combined(early: Generation, full: Generation) -> Generation:
    """The full generation, its token count the sum of both: what the verdict cost."""
    if early.tokens is None or full.tokens is None:
        return full
    return Generation(full.text, early.tokens + full.tokens, full.finish_reason, full.error)
