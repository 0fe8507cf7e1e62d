"""What happens to one consumed message: decode, pair, submit to the guard, queue its output.

Transport-neutral apart from the event's `.value`, `.key` and `.message` (topic, partition,
offset), so the Faust agents stay small `async for` loops that call `on_prompt`/`on_response`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from engine.batcher import BatcherClosed
from engine.guard import Guard, ModerationResult
from schemas.decode import DecodeError, InputLimits, decode_event
from schemas.events import EventKind, PromptEvent, ResponseEvent, SourceRef
from schemas.verdict import ModerationRequest, Verdict
from service.config import Settings
from service.lanes import Ack, Item, Lane, Send, Transact
from service.messages import (
    Outgoing,
    dead_letter,
    dead_letter_headers,
    dead_letter_key,
    verdict_event,
)
from service.pairing import PromptStore
from service.telemetry import Telemetry, Track

log = logging.getLogger("guardstream.pipeline")


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

    # --- entry points ------------------------------------------------------------------------

    async def on_prompt(self, event: Any, ack: Ack) -> None:
        t0 = time.monotonic()
        track = self._telemetry.begin(event)
        lane, source = self._lane(event, ack)
        try:
            with track.parse():
                prompt = decode_event(event.value, PromptEvent, self._limits)
        except DecodeError as err:
            lane.put(Item(event, ready=self._dead(event, source, err, track), on_done=track.done))
            return
        if self.settings.moderate in ("responses", "both"):
            self.store.put(prompt.id, prompt.text, source.partition)
        if self.settings.moderate == "responses":
            lane.put(Item(event, ready=[], on_done=track.done))
            return
        request = ModerationRequest(
            prompt=prompt.text, prompt_id=prompt.id, conversation_id=prompt.conversation_id
        )
        with track.current():
            future = await self.guard.submit(request)
        lane.put(self._item(event, future, prompt, "prompt", source, t0, track))

    async def on_response(self, event: Any, ack: Ack) -> None:
        t0 = time.monotonic()
        track = self._telemetry.begin(event)
        lane, source = self._lane(event, ack)
        try:
            with track.parse():
                response = decode_event(event.value, ResponseEvent, self._limits)
        except DecodeError as err:
            lane.put(Item(event, ready=self._dead(event, source, err, track), on_done=track.done))
            return
        if self.settings.moderate == "prompts":
            lane.put(Item(event, ready=[], on_done=track.done))
            return
        prompt_text = response.prompt or self.store.get(response.reply_to)
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
            lane.put(self._item(event, future, response, "response", source, t0, track))
            return
        # The prompt has not been seen (yet): wait for it without holding up the stream.
        with track.current():  # the task inherits the message span as its current one
            waiting = asyncio.get_running_loop().create_task(self._paired_later(response))
        lane.put(self._item(event, waiting, response, "response", source, t0, track))

    async def close(self, timeout: float | None) -> bool:
        """Publish what is in flight within `timeout`; True when everything was published."""
        results = await asyncio.gather(*(lane.close(timeout) for lane in self._lanes.values()))
        return all(results)

    @property
    def pending(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    # --- internals ---------------------------------------------------------------------------

    async def _paired_later(self, response: ResponseEvent) -> tuple[ModerationResult, bool]:
        wait_s = self.settings.pairing_wait_ms / 1000
        prompt_text = await self.store.wait_for(response.reply_to, wait_s)
        request = ModerationRequest(
            prompt=prompt_text or "",
            response=response.text,
            prompt_id=response.reply_to,
            response_id=response.id,
            conversation_id=response.conversation_id,
        )
        return await self.guard.moderate(request), prompt_text is None

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
    ) -> Item:
        def convert(value: ModerationResult | tuple[ModerationResult, bool]) -> list[Outgoing]:
            result, missing = value if isinstance(value, tuple) else (value, False)
            return self._verdict_records(chat, kind, result, source, t0, missing, track)

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
            return self._verdict_records(chat, kind, failed, source, t0, False, track)

        return Item(
            event, future=future, convert=convert, on_failure=on_failure, on_done=track.done
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
    ) -> list[Outgoing]:
        ve = verdict_event(
            chat,
            kind,
            result,
            source=source,
            model_id=self.guard.model_id,
            model_revision=self.guard.revision,
            engine=self._engine,
            policy=self.settings.policy,
            latency_ms=(time.monotonic() - t0) * 1000,
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
            *track.verdict(ve, chat),  # W3C trace context: the trace goes on downstream
            *self._mode_headers,
        )
        records = [Outgoing(self.settings.topic_verdicts, key, value, headers)]
        if ve.flagged and not self.settings.shadow:
            records.append(Outgoing(self.settings.topic_flagged, key, value, headers))
        return records
