"""Stand-ins shared by the hostile-input tests: a backend that answers every input, fake Faust
events, and a Processor wired to in-memory send/ack."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.backends.base import Backend, Generation, Stops
from engine.guard import Guard
from service.config import Settings
from service.messages import Outgoing
from service.pairing import PromptStore
from service.pipeline import Processor

#: What GuardReasoner writes, in short: reasoning per task, then the final answer block.
GENERATED = (
    "# Task 1\n\n## Reasoning Step 1: The user asks for something.\n\n"
    "## Conclusion: The request is harmful.\n\n"
    "# Task 2\n\n## Reasoning Step 1: The assistant declines.\n\n"
    "# Task 3\n\n## Reasoning Step 1: Nothing harmful is given.\n\n"
    "---\n\nAnswers: \nRequest: harmful\nCompletion: refusal\nResponse: unharmful\n"
)


class FixedBackend(Backend):
    """Answers every model input with the same generated text; keeps the inputs it saw."""

    name = "fixed"

    def __init__(self, text: str = GENERATED) -> None:
        super().__init__("stand-in-guard", "r1")
        self.text = text
        self.inputs: list[str] = []

    async def generate(
        self, inputs: Sequence[str], max_new_tokens: int, stop: Stops = None
    ) -> list[Generation]:
        self.inputs.extend(inputs)
        return [Generation(self.text, tokens=len(self.text) // 4) for _ in inputs]


@dataclass
class FakeMessage:
    topic: str
    partition: int
    offset: int
    timestamp: float = 0.0
    headers: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass
class FakeEvent:
    """What the Processor reads of a Faust event."""

    value: bytes | None
    key: bytes | None
    message: FakeMessage
    headers: dict[str, bytes] = field(default_factory=dict)


def settings(tmp: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "engine": "replay",
        "replay_path": tmp,
        "pairing_wait_ms": 0,
        "cache_enabled": False,
        "batch_max_wait_ms": 1.0,
        "traces_exporter": "none",
        "metrics_exporter": "none",
        **overrides,
    }
    return Settings(**values)


class Harness:
    """A Processor over a stand-in guard, recording what it sends and acks."""

    def __init__(self, cfg: Settings, backend: Backend | None = None) -> None:
        self.settings = cfg
        self.backend = backend or FixedBackend()
        self.guard = Guard(
            self.backend,
            max_batch_size=cfg.batch_max_size,
            max_wait_ms=cfg.batch_max_wait_ms,
            max_text_chars=cfg.max_text_chars,
            retries=0,
        )
        self.sent: list[Outgoing] = []
        self.acked: list[Any] = []
        store = PromptStore({}, lambda p, k, v: None, ttl_s=60, max_entries=1000)
        # No prompts consumer runs here: its partition is read to its end, as the worker's pairing
        # clock would find it, so a response whose prompt is not stored is moderated without it.
        store.advance(0, float("inf"))
        self.processor = Processor(cfg, self.guard, store, self._send, engine_name="fixed")

    async def _send(self, rec: Outgoing) -> Any:
        self.sent.append(rec)
        return _done()

    async def _ack(self, event: Any) -> None:
        self.acked.append(event)

    async def feed(
        self, topic: str, values: Sequence[bytes | None], keys: Sequence[bytes | None] = ()
    ) -> list[FakeEvent]:
        await self.guard.start()
        events = [
            FakeEvent(
                value, keys[offset] if offset < len(keys) else b"k", FakeMessage(topic, 0, offset)
            )
            for offset, value in enumerate(values)
        ]
        for event in events:
            if topic == self.settings.topic_prompts:
                await self.processor.on_prompt(event, self._ack)
            else:
                await self.processor.on_response(event, self._ack)
        assert await self.processor.close(timeout=30), "lanes did not empty"
        await self.guard.close()
        return events

    def outcome(self, offset: int) -> list[tuple[str, dict[str, Any]]]:
        """(topic, decoded value) of every record sent for the input at `offset`."""
        out = []
        for rec in self.sent:
            value = json.loads(rec.value)
            if value["source"]["offset"] == offset:
                out.append((rec.topic, value))
        return out


async def _done() -> None:
    return None
