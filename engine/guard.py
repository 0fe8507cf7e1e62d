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
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

from opentelemetry.trace import Tracer

from engine.backends.base import Backend, Generation
from engine.batcher import BatcherClosed, MicroBatcher
from engine.cache import VerdictCache, cache_key
from engine.cascade import EscalationPolicy, escalation_reason
from engine.parser import CONFLICT_RULE, PARSER_VERSION, needs_full_output, parse
from engine.prompt import EARLY_EXIT_STOP, TEMPLATE_VERSION, build_model_input, user_texts
from engine.retry import RetryPolicy
from engine.retry import generate as generate_with_retries
from engine.tracing import BatchTrace, BatchTracer, Parent, current_parent
from schemas.verdict import Escalation, FirstOpinion, ModerationRequest, Verdict

log = logging.getLogger("guardstream.guard")
_T = TypeVar("_T")


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
    #: Set while a cascade's first model answered and its policy sends the request on (the
    #: signal): the guard's own, never in a result the caller gets.
    escalate: str | None = None


@dataclass(slots=True)
class _Pending:
    request: ModerationRequest
    key: str
    enqueued: float = field(default_factory=time.monotonic)
    parents: list[Parent] | None = None  # callers' span contexts, only when tracing


@dataclass(slots=True)
class _Escalating:
    pending: _Pending
    first: ModerationResult


@dataclass(frozen=True, slots=True)
class Cascade:
    """A second model, asked only where the escalation policy says the first one's output
    cannot be trusted; `max_sequences`: its own budget of requests at once."""

    backend: Backend
    policy: EscalationPolicy
    max_sequences: int = 64
    #: The second model's own retries and deadline: an escalated request waits at most about
    #: this long for it before the first verdict is published, marked (and its partition's
    #: later verdicts, which leave in order, wait no longer than that either). None: the
    #: guard's policy.
    retry: RetryPolicy | None = None


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
    #: Requests a cascade sent to its second model, per (signal, outcome: answered | failed).
    escalations: dict[tuple[str, str], int] = field(default_factory=dict)
    escalation_tokens: int = 0  # tokens the second model generated


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
        cascade: Cascade | None = None,
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
        self.cascade = cascade
        self._escalations: MicroBatcher[_Escalating, ModerationResult] | None = None
        if cascade is not None:
            # The second model has its own admission (by its own kind) and budget: requests
            # sent to it never take the first model's places.
            if admission_mode(admission, cascade.backend) == "request":
                size, wait_ms, slots = 1, 0.0, cascade.max_sequences
            else:
                size = min(max_batch_size, cascade.max_sequences)
                wait_ms, slots = max_wait_ms, max(1, cascade.max_sequences // size)
            self._escalations = MicroBatcher(
                self._escalate,
                max_batch_size=size,
                max_wait_ms=wait_ms,
                max_in_flight=slots,
                key=lambda e: e.pending.key,
                name="guard-escalate",
            )
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
        self._stores: MicroBatcher[tuple[str, Verdict], None] | None = None
        if cache is not None:
            # Stores are coalesced like lookups: with per-request admission every verdict ends
            # in a model call of its own, and one pipelined write per call would be a Redis
            # round trip per message. A verdict is stored before its request is answered.
            self._stores = MicroBatcher(
                self._store,
                max_batch_size=max(4 * max_batch_size, 64),
                max_wait_ms=LOOKUP_WAIT_MS,
                max_in_flight=LOOKUP_IN_FLIGHT,
                key=lambda kv: kv[0],
                name="guard-cache-store",
            )
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
        if self.cascade is not None:
            await self.cascade.backend.start()

    async def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        if self._lookups is not None:
            await self._lookups.close(drain=drain, timeout=timeout)
        if self._forwarding:
            if not drain:
                for task in self._forwarding:
                    task.cancel()
            await asyncio.wait(list(self._forwarding), timeout=timeout)
        await self._batcher.close(drain=drain, timeout=timeout)
        if self._escalations is not None:
            assert self.cascade is not None
            if self._forwarding:  # first-model results that went on to the second meanwhile
                await asyncio.wait(list(self._forwarding), timeout=timeout)
            await self._escalations.close(drain=drain, timeout=timeout)
            await self.cascade.backend.close()
        if self._stores is not None:
            await self._stores.close(drain=drain, timeout=timeout)
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
            variant=self.variant + self._cascade_variant(),
        )

    def _cascade_variant(self) -> str:
        """A cascade's verdicts are the cascade's: keyed by the second model (its id and
        revision, read now: a revision derived at start is known only then) and the policy."""
        if self.cascade is None:
            return ""
        second = self.cascade.backend
        return f";cascade={second.model_id}@{second.revision};escalate={self.cascade.policy.name}"

    async def submit(self, request: ModerationRequest) -> asyncio.Future[ModerationResult]:
        """Queue a request; waits only while the engine is full (backpressure)."""
        self.stats.requests += 1
        pending = _Pending(request, self.key_for(request))
        if self._tracing is not None:
            parent = current_parent()
            pending.parents = [parent] if parent is not None else None
        if self._lookups is None:
            if self.cascade is None:
                return await self._batcher.submit(pending)
            first = await self._batcher.submit(pending)
            answer: asyncio.Future[ModerationResult] = asyncio.get_running_loop().create_future()
            first.add_done_callback(lambda done: self._after_first(pending, done, answer))
            return answer
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
        target = result
        if self.cascade is not None:  # the first model's answer may go on to the second
            target = asyncio.get_running_loop().create_future()
            target.add_done_callback(lambda done: self._after_first(pending, done, result))
        try:
            queued = self._batcher.submit_nowait(pending, target)
        except BatcherClosed as closed:
            target.set_exception(closed)
            return
        if queued is not None:  # the batcher settles `target` itself
            return
        self._spawn(self._forward(self._batcher, pending, target))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._forwarding.add(task)
        task.add_done_callback(self._forwarding.discard)

    async def _forward(
        self,
        batcher: MicroBatcher[_T, ModerationResult],
        item: _T,
        result: asyncio.Future[ModerationResult],
    ) -> None:
        """A miss that found the model's places full: wait for room (the backpressure)."""
        try:
            await batcher.submit(item, result)
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
        t0 = time.monotonic()
        generations, verdicts = await self._run_model(self.backend, items, texts, self.retry)
        generate_ms = (time.monotonic() - t0) * 1000
        if bt is not None:
            bt.generate(t0, t0 + generate_ms / 1000, [g.tokens for g in generations])
        results: list[ModerationResult] = []
        to_store: list[tuple[str, Verdict]] = []
        for p, wait_ms, gen, verdict, quoted in zip(
            items, waits, generations, verdicts, texts, strict=True
        ):
            if gen.finish_reason == "error":
                self.stats.engine_errors += 1
            else:
                self.stats.generated += 1
                self.stats.tokens += gen.tokens or 0
            reason: str | None = None
            if self.cascade is not None:
                reason = escalation_reason(
                    verdict,
                    self.cascade.policy,
                    has_response=p.request.response is not None,
                    quoted=quoted,
                )
                if reason is None:
                    verdict = verdict.model_copy(
                        update={
                            "escalation": Escalation(answered_by=self.model_id, escalated=False)
                        }
                    )
            # An untrusted verdict is never served again (it is redone), nor one on its way to
            # the cascade's second model (the second's is the cascade's verdict).
            if verdict.trusted and reason is None:
                to_store.append((p.key, verdict))
            results.append(
                ModerationResult(
                    verdict, False, p.key, len(items), wait_ms, generate_ms, gen.tokens, reason
                )
            )
        if to_store:
            t_store = time.monotonic()
            await self._store_all(to_store)
            if bt is not None:
                bt.cache_store(t_store, time.monotonic(), len(to_store))
        if self._on_batch is not None:
            self._on_batch(len(items), waits, generate_ms)
        return results

    async def _store_all(self, items: list[tuple[str, Verdict]]) -> None:
        """Store verdicts in the cache (batched with other calls' stores); never raises for a
        cache failure (the cache drops what it cannot write)."""
        if self._stores is None or not items:
            return
        futures = [await self._stores.submit(item) for item in items]
        await asyncio.gather(*futures, return_exceptions=True)

    async def _store(self, items: list[tuple[str, Verdict]]) -> list[None]:
        assert self.cache is not None
        await self.cache.set_many(items)
        return [None] * len(items)

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

    async def _run_model(
        self,
        backend: Backend,
        items: Sequence[_Pending],
        texts: list[tuple[str, str | None]],
        retry: RetryPolicy,
    ) -> tuple[list[Generation], list[Verdict]]:
        """Generate for `items` on `backend` and parse: prompt-only requests stop at Task 2
        (early exit), and one whose Task 1 cannot be read is generated again in full (greedy:
        the same Task 1, then the final answer block the parser can read)."""
        inputs = [build_model_input(prompt, response) for prompt, response in texts]
        early = [self.early_exit and p.request.response is None for p in items]
        generations = await self._generate(backend, inputs, early, retry)
        verdicts = [
            self._verdict(gen, p.request.response is not None, quoted, early_exit=cut)
            for p, gen, quoted, cut in zip(items, generations, texts, early, strict=True)
        ]
        again = [i for i, v in enumerate(verdicts) if needs_full_output(v)]
        if again:
            self.stats.regenerated += len(again)
            full = await self._generate(backend, [inputs[i] for i in again], None, retry)
            for i, gen in zip(again, full, strict=True):
                generations[i] = _combined(generations[i], gen)
                verdicts[i] = self._verdict(gen, False, texts[i], early_exit=False)
        self.stats.early_exits += sum(v.early_exit for v in verdicts)
        return generations, verdicts

    async def _generate(
        self, backend: Backend, inputs: list[str], early: list[bool] | None, retry: RetryPolicy
    ) -> list[Generation]:
        """Generate under the retry policy (`engine.retry`); `early[i]`: input i stops at Task
        2. Inputs that still fail get error Generations."""
        stop = [EARLY_EXIT_STOP if cut else None for cut in early] if early else None
        if stop is not None and not any(stop):
            stop = None
        return await generate_with_retries(
            backend, inputs, self.max_new_tokens, stop, policy=retry
        )

    # --- the cascade's second model ----------------------------------------------------------

    def _after_first(
        self,
        pending: _Pending,
        first: asyncio.Future[ModerationResult],
        result: asyncio.Future[ModerationResult],
    ) -> None:
        """The first model's result is in: it is the answer, or it goes on to the second."""
        if result.done():
            return
        if first.cancelled():
            result.set_exception(BatcherClosed("the first model's batch was cancelled"))
            return
        if (exc := first.exception()) is not None:
            result.set_exception(exc)
            return
        answered = first.result()
        if answered.escalate is None or self._escalations is None:
            result.set_result(answered)
            return
        item = _Escalating(pending, answered)
        try:
            queued = self._escalations.submit_nowait(item, result)
        except BatcherClosed as closed:
            result.set_exception(closed)
            return
        if queued is None:  # the second model is full: wait for a place (its own budget)
            self._spawn(self._forward(self._escalations, item, result))

    async def _escalate(self, items: list[_Escalating]) -> list[ModerationResult]:
        assert self.cascade is not None
        second = self.cascade.backend
        texts = [
            user_texts(
                e.pending.request.prompt, e.pending.request.response, max_chars=self.max_text_chars
            )
            for e in items
        ]
        t0 = time.monotonic()
        retry = self.cascade.retry or self.retry
        pendings = [e.pending for e in items]
        generations, verdicts = await self._run_model(second, pendings, texts, retry)
        second_ms = (time.monotonic() - t0) * 1000
        results: list[ModerationResult] = []
        to_store: list[tuple[str, Verdict]] = []
        for item, gen, verdict in zip(items, generations, verdicts, strict=True):
            first = item.first.verdict
            reason = item.first.escalate
            self.stats.escalation_tokens += gen.tokens or 0
            if gen.finish_reason == "error":
                outcome = "failed"
                # The second model failed on it: the first model's verdict stands, marked, and
                # is not cached (next time the cascade is asked again).
                final = first.model_copy(
                    update={
                        "escalation": Escalation(
                            answered_by=self.model_id,
                            escalated=True,
                            reason=reason,
                            error=gen.error or "engine error",
                        )
                    }
                )
            else:
                outcome = "answered"
                opinion = FirstOpinion(
                    model_id=self.model_id,
                    request=first.request,
                    completion=first.completion,
                    response=first.response,
                    trust=first.trust,
                )
                final = verdict.model_copy(
                    update={
                        "escalation": Escalation(
                            answered_by=second.model_id,
                            escalated=True,
                            reason=reason,
                            first=opinion,
                        )
                    }
                )
                if final.trusted:
                    to_store.append((item.pending.key, final))
            counted = (reason or "unknown", outcome)
            self.stats.escalations[counted] = self.stats.escalations.get(counted, 0) + 1
            tokens = (item.first.tokens or 0) + (gen.tokens or 0)
            results.append(
                replace(
                    item.first,
                    verdict=final,
                    generate_ms=item.first.generate_ms + second_ms,
                    tokens=tokens,
                    escalate=None,
                )
            )
        await self._store_all(to_store)
        return results


def _combined(early: Generation, full: Generation) -> Generation:
    """The full generation, its token count the sum of both: what the verdict cost."""
    if early.tokens is None or full.tokens is None:
        return full
    return Generation(full.text, early.tokens + full.tokens, full.finish_reason, full.error)
