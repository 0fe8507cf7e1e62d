"""What happens to one consumed message: decode, pair, submit to the guard, queue its output.

Transport-neutral apart from the event's `.value`, `.key` and `.message` (topic, partition,
offset), so the Faust agents stay small `async for` loops that call `on_prompt`/`on_response`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from engine.batcher import BatcherClosed
from engine.guard import Guard, ModerationResult
from schemas.decode import DecodeError, InputLimits, decode_event
from schemas.events import EventKind, PromptEvent, ResponseEvent, SourceRef
from schemas.verdict import ModerationRequest, Verdict
from service.config import Settings
from service.copartition import PartitionCheck
from service.lanes import Ack, Item, Lane, LaneStopped, Send, Transact
from service.messages import (
    Outgoing,
    dead_letter,
    dead_letter_headers,
    dead_letter_key,
    verdict_event,
)
from service.pairing import PromptStore, prompt_key
from service.telemetry import Telemetry, Track

log = logging.getLogger("guardstream.pipeline")


def _ignore(message: Any) -> None:
    return None


def _always(message: Any) -> bool:
    return True


def _timestamp(event: Any) -> float:
    """The message's Kafka timestamp (epoch seconds; the producer's create time by default)."""
    ts = getattr(event.message, "timestamp", None)
    return float(ts) if isinstance(ts, int | float) and ts > 0 else time.time()


class Processor:
    def __init__(
        self,
        settings: Settings,
        guard: Guard,
        store: PromptStore,
        send: Send,
        *,
        engine_name: str,
        on_dead_letter: Callable[[str], None] | None = None,
        transact: Transact | None = None,
        telemetry: Telemetry | None = None,
        partitions: int | None = None,
    ) -> None:
        self.settings = settings
        self.guard = guard
        self.store = store
        self._send = send
        self._engine = engine_name
        self._mode_headers: tuple[tuple[str, bytes], ...] = (
            (("guardstream-shadow", b"1"),) if settings.shadow else ()
        )
        self._limits: InputLimits = settings.input_limits
        self._lanes: dict[tuple[str, int], Lane] = {}
        self._on_dead_letter = on_dead_letter
        self._transact = transact  # exactly_once: service.eos.TransactionalPublisher.publish
        self.dead_letters = 0
        self._telemetry = telemetry if telemetry is not None else Telemetry.off(settings)
        metrics = self._telemetry.metrics
        self._pairing = metrics.pairing
        #: Co-partitioning check (None: the partition count is not known, nothing checked).
        self.partition_check = PartitionCheck(partitions) if partitions else None
        if self.partition_check is not None:
            metrics.misrouted = self.partition_check.misrouted
        #: Offset of the last prompt stored, per prompts partition (the pairing clock reads it).
        self.prompt_offsets: dict[int, int] = {}
        # Backpressure: events held per input topic (in lanes, waiting for the model or for a
        # prompt) are bounded; an agent waits for a place before it takes the next event.
        #: The prompts partitions this worker holds now (the app's consumer assignment).
        self.held_prompt_partitions: Callable[[], frozenset[int]] = frozenset
        #: Called with each message the processor takes (`service.acks.AckGuard.take`).
        self.take: Callable[[Any], None] = _ignore
        #: Whether a message is of the consumer's current assignment (the app: same generation,
        #: no rebalance under way). One that is not is handed back instead of being published.
        self.current: Callable[[Any], bool] = _always
        self._room = {
            topic: asyncio.Semaphore(settings.max_pending)
            for topic in (settings.topic_prompts, settings.topic_responses)
        }

    # --- entry points ------------------------------------------------------------------------

    async def on_prompt(self, event: Any, ack: Ack) -> None:
        t0 = time.monotonic()
        track = self._telemetry.begin(event)
        entered = await self._enter(event, ack)
        if entered is None:
            return
        lane, source, release = entered
        try:
            with track.parse():
                prompt = decode_event(event.value, PromptEvent, self._limits)
        except DecodeError as err:
            ready = self._dead(event, source, err, track)
            self._put(lane, Item(event, ready=ready, on_done=track.done, release=release))
            return
        self._check_partition(source, prompt.conversation_id)
        stored: list[Outgoing] = []
        if self.settings.moderate in ("responses", "both"):
            key = prompt_key(prompt.tenant, prompt.conversation_id, prompt.id)
            record = self.store.put(key, prompt.text, source.partition, _timestamp(event))
            if record is not None:
                stored.append(record)
        self.prompt_offsets[source.partition] = source.offset
        if self.settings.moderate == "responses":
            self._put(lane, Item(event, ready=stored, on_done=track.done, release=release))
            return
        request = ModerationRequest(
            prompt=prompt.text, prompt_id=prompt.id, conversation_id=prompt.conversation_id
        )
        with track.current():
            future = await self.guard.submit(request)
        item = self._item(event, future, prompt, "prompt", source, t0, track, release, stored)
        self._put(lane, item)

    async def on_response(self, event: Any, ack: Ack) -> None:
        t0 = time.monotonic()
        track = self._telemetry.begin(event)
        entered = await self._enter(event, ack)
        if entered is None:
            return
        lane, source, release = entered
        try:
            with track.parse():
                response = decode_event(event.value, ResponseEvent, self._limits)
        except DecodeError as err:
            ready = self._dead(event, source, err, track)
            self._put(lane, Item(event, ready=ready, on_done=track.done, release=release))
            return
        if self.settings.moderate == "prompts":
            self._put(lane, Item(event, ready=[], on_done=track.done, release=release))
            return
        self._check_partition(source, response.conversation_id)
        key = prompt_key(response.tenant, response.conversation_id, response.reply_to)
        prompt_text = response.prompt
        if prompt_text is not None:
            self._pairing[("inline",)] += 1
        else:
            prompt_text = self.store.get(key)
            if prompt_text is not None:
                self._pairing[("table",)] += 1
        if prompt_text is not None:
            request = ModerationRequest(
                prompt=prompt_text,
                response=response.text,
                prompt_id=response.reply_to,
                response_id=response.id,
                conversation_id=response.conversation_id,
            )
            with track.current():
                future = await self.guard.submit(request)
            item = self._item(event, future, response, "response", source, t0, track, release)
            self._put(lane, item)
            return
        # The prompt has not been seen (yet): wait for it by event time, without holding up
        # the stream (the lane keeps the partition's order; the event keeps its place).
        partitions = self._prompt_partitions(source.partition, response.conversation_id)
        with track.current():  # the task inherits the message span as its current one
            waiting = asyncio.get_running_loop().create_task(
                self._paired_later(response, key, _timestamp(event), partitions)
            )
        item = self._item(event, waiting, response, "response", source, t0, track, release)
        item.waits_prompt = True
        self._put(lane, item)

    def give_back(self) -> int:
        """Partitions are being revoked (Faust revokes them all at once) or the worker stops:
        give up the responses
        that wait for their prompt, and everything behind them in their lane, unpublished and
        unacknowledged, so that the rebalance does not wait for them; whoever owns their
        partition next reads them again, after recovering the prompts table. Returns how many
        events were given up."""
        given_up = 0
        for lane in self._lanes.values():
            # A failed lane publishes nothing more: all of its events go back.
            taken = lane.take_all() if lane.failed is not None else lane.give_up_waiting()
            if taken:
                first = taken[0].event.message
                log.info(
                    "handing back %d events of %s from offset %d",
                    len(taken),
                    lane.name,
                    first.offset,
                )
            for item in taken:
                self._hand_back(item)
                given_up += 1
        self.store.reset()
        self.prompt_offsets.clear()
        if given_up:
            log.info("%d events handed back unpublished, to be read again", given_up)
        return given_up

    def _put(self, lane: Lane, item: Item) -> None:
        """Queue `item` in its lane, unless a rebalance began since the agent took its event
        (the agent may have waited for the model's room meanwhile): such an event is of an
        assignment that is over (its partition may be another worker's now, or re-read from its
        committed offset here) and goes back, unpublished and uncommitted."""
        message = item.event.message
        live = self._lanes.get((message.topic, message.partition)) is lane
        if not (live and self.current(message)):
            self._hand_back(item)
            return
        try:
            queued = lane.put(item)
        except LaneStopped:  # closing at shutdown
            queued = False
        if not queued:  # sealed by a hand-back: this one goes back too
            self._hand_back(item)

    @staticmethod
    def _hand_back(item: Item) -> None:
        if item.future is not None and not item.future.done() and item.waits_prompt:
            item.future.cancel()
        # Faust waits at a rebalance for every event it handed out to be acked; marking it
        # acked without `Consumer.ack` releases that wait and commits nothing, so the offset
        # stays where the last published event left it and the event is read again.
        item.event.message.acked = True
        if item.release is not None:
            item.release()

    def drop_lanes(self, tps: Any) -> None:
        """Forget the lanes of revoked partitions (they are idle by now: Faust waited for them)."""
        for tp in tps:
            lane = self._lanes.pop((tp.topic, tp.partition), None)
            if lane is not None:
                asyncio.get_running_loop().create_task(lane.close(timeout=None))

    def unhealthy_lanes(self) -> dict[str, str]:
        """Lanes that stopped or keep failing, with why."""
        return {
            lane.name: (lane.failed or lane.stalled or "")
            for lane in self._lanes.values()
            if not lane.healthy
        }

    async def close(self, timeout: float | None) -> bool:
        """Publish what is in flight within `timeout`; True when everything was published."""
        results = await asyncio.gather(*(lane.close(timeout) for lane in self._lanes.values()))
        return all(results)

    @property
    def pending(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    # --- internals ---------------------------------------------------------------------------

    async def _paired_later(
        self, response: ResponseEvent, key: str, ts: float, partitions: frozenset[int]
    ) -> tuple[ModerationResult, bool]:
        prompt_text, how = await self.store.wait_for(key, ts, partitions)
        self._pairing[(how,)] += 1
        request = ModerationRequest(
            prompt=prompt_text or "",
            response=response.text,
            prompt_id=response.reply_to,
            response_id=response.id,
            conversation_id=response.conversation_id,
        )
        return await self.guard.moderate(request), prompt_text is None

    async def _enter(
        self, event: Any, ack: Ack
    ) -> tuple[Lane, SourceRef, Callable[[], None] | None] | None:
        """Wait for a place in the event's topic's bound; its lane, source and place's release;
        None when a rebalance came meanwhile (the event was handed back)."""
        self.take(event.message)
        room = self._room.get(event.message.topic)
        if room is not None:
            await room.acquire()
        release = room.release if room is not None else None
        if not self.current(event.message):
            self._hand_back(Item(event, release=release))
            return None
        lane, source = self._lane(event, ack)
        return lane, source, release

    def _check_partition(self, source: SourceRef, conversation_id: str) -> bool:
        check = self.partition_check
        if check is None:
            return True
        return check.check(source.topic, source.partition, conversation_id)

    def _prompt_partitions(self, partition: int, conversation_id: str) -> frozenset[int]:
        """The prompts partitions a response's prompt can be in, of those this worker holds: its
        own partition number (co-partitioned producers put it there) and, for a response not
        where murmur2 puts its conversation, where murmur2 puts it (a Java-partitioned prompts
        producer). A partition this worker does not hold is left out: its stream never moves
        here, so waiting for it would only wait for the wall-clock bound."""
        own = frozenset((partition,))
        check = self.partition_check
        if check is None:
            return own
        expected = check.expected(conversation_id)
        if expected == partition:
            return own
        held = self.held_prompt_partitions()
        return own | ({expected} & held)

    def _lane(self, event: Any, ack: Ack) -> tuple[Lane, SourceRef]:
        msg = event.message
        source = SourceRef(topic=msg.topic, partition=msg.partition, offset=msg.offset)
        key = (msg.topic, msg.partition)
        lane = self._lanes.get(key)
        if lane is None:
            lane = Lane(
                f"{msg.topic}/{msg.partition}",
                self._send,
                ack,
                fatal=(BatcherClosed,),
                transact=self._transact,
                stall_after_s=self.settings.publish_stall_s,
            )
            self._lanes[key] = lane
        return lane, source

    def _dead(
        self, event: Any, source: SourceRef, err: DecodeError, track: Track
    ) -> list[Outgoing]:
        self.dead_letters += 1
        if self._on_dead_letter is not None:
            self._on_dead_letter(err.reason)
        log.info(
            "dead letter %s/%d@%d: %s (%s)",
            source.topic,
            source.partition,
            source.offset,
            err.reason,
            err,
            extra={**track.fields(), "reason": err.reason},
        )
        letter = dead_letter(event.value, event.key, source, err.reason, str(err))
        return [
            Outgoing(
                self.settings.topic_dlq,
                dead_letter_key(event.key),
                letter.model_dump_json().encode(),
                dead_letter_headers(letter) + track.dead_letter(err.reason),
            )
        ]

    def _item(
        self,
        event: Any,
        future: asyncio.Future[Any],
        chat: PromptEvent | ResponseEvent,
        kind: EventKind,
        source: SourceRef,
        t0: float,
        track: Track,
        release: Callable[[], None] | None,
        before: Sequence[Outgoing] = (),
    ) -> Item:
        """The lane item of a verdict to come; `before`: records published ahead of it (the
        prompt's changelog record)."""
        # When the verdict was ready: the lane publishes it later, once every earlier offset of
        # its partition is out (in-order delivery); `latency_ms` is to readiness, and the wait
        # behind earlier offsets goes in a header of its own.
        ready_at: list[float] = []
        future.add_done_callback(lambda _: ready_at.append(time.monotonic()))

        def convert(value: ModerationResult | tuple[ModerationResult, bool]) -> list[Outgoing]:
            result, missing = value if isinstance(value, tuple) else (value, False)
            ready = ready_at[0] if ready_at else time.monotonic()
            records = self._verdict_records(
                chat, kind, result, source, t0, missing, track, ready=ready
            )
            return [*before, *records] if before else records

        def on_failure(exc: BaseException) -> list[Outgoing]:
            if isinstance(exc, BatcherClosed):
                raise exc
            log.error(
                "moderation of %s failed unexpectedly: %r",
                chat.id,
                exc,
                extra={**track.fields(), "message_id": chat.id},
            )
            error = f"{type(exc).__name__}: {exc}"
            failed = ModerationResult(Verdict(engine_error=error), False, "")
            records = self._verdict_records(chat, kind, failed, source, t0, False, track)
            return [*before, *records] if before else records

        return Item(
            event,
            future=future,
            convert=convert,
            on_failure=on_failure,
            on_done=track.done,
            release=release,
        )

    def _verdict_records(
        self,
        chat: PromptEvent | ResponseEvent,
        kind: EventKind,
        result: ModerationResult,
        source: SourceRef,
        t0: float,
        prompt_missing: bool,
        track: Track,
        *,
        ready: float | None = None,
    ) -> list[Outgoing]:
        now = time.monotonic()
        ready = now if ready is None else ready
        ve = verdict_event(
            chat,
            kind,
            result,
            source=source,
            model_id=self.guard.model_id,
            model_revision=self.guard.revision,
            engine=self._engine,
            policy=self.settings.policy,
            latency_ms=(ready - t0) * 1000,
            prompt_missing=prompt_missing,
        )
        key = chat.conversation_id.encode()
        value = ve.model_dump_json().encode()
        # Where the time went, for consumers and the bench: the batch wait (submit to batch
        # start) and the model's share (the batch's generate call; 0 for a cache hit).
        headers = (
            ("guardstream-event-id", ve.event_id.encode()),
            ("guardstream-batch-wait-ms", b"%.3f" % result.batch_wait_ms),
            ("guardstream-generate-ms", b"%.3f" % result.generate_ms),
            # ready to published: the wait behind earlier offsets of the same input partition
            ("guardstream-order-wait-ms", b"%.3f" % ((now - ready) * 1000)),
            *track.verdict(ve, chat),  # W3C trace context: the trace goes on downstream
            *self._mode_headers,
        )
        records = [Outgoing(self.settings.topic_verdicts, key, value, headers)]
        if ve.flagged and not self.settings.shadow:
            records.append(Outgoing(self.settings.topic_flagged, key, value, headers))
        return records
