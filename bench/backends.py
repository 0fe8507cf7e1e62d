"""Model stand-ins for the bench, behind the engine's own `Backend` protocol.

`HashReplayBackend` answers any model input with a real GuardReasoner output recorded in the
shared data, chosen by a hash of the input: the same input always gets the same output, the
parser and the verdict events see real generated text, and the model costs nothing. So texts
can be made unique (no cache hit, no dedupe) without needing a recording for each.

`StandInBackend` adds a fixed cost per `generate` call: it sleeps `a + b * batch_size`
milliseconds, the shape of a batched decode on a GPU (a fixed cost per decode step times the
number of steps, plus a per-sequence share). Calls overlap, as requests do on an in-flight-batching
server: the guard bounds them with `max_in_flight`.

`Counting` wraps any backend and counts calls and inputs, so the bench can tell how many model
calls the cache and the in-batch dedupe avoided.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from engine.backends.base import Backend, Batching, Generation, Stops, per_input_stops
from engine.backends.replay import approx_tokens


class HashReplayBackend(Backend):
    name = "hashreplay"

    def __init__(self, outputs: Sequence[str], model_id: str = "GuardReasoner-1B-bench") -> None:
        if not outputs:
            raise ValueError("HashReplayBackend needs at least one recorded output")
        self.outputs = list(outputs)
        digest = hashlib.sha256("\x1e".join(self.outputs).encode()).hexdigest()[:12]
        super().__init__(model_id, f"hash-{digest}")

    def answer(self, model_input: str, max_new_tokens: int, stop: str | None = None) -> Generation:
        """The recorded output chosen by the input's hash, as an engine would return it: cut
        before `stop` where the output holds it (finish "stop"; the stop string's tokens are
        counted, since an engine decodes them before it can match them), else at
        `max_new_tokens` (finish "length")."""
        h = int.from_bytes(hashlib.blake2b(model_input.encode(), digest_size=8).digest(), "big")
        full = text = decoded = self.outputs[h % len(self.outputs)]
        if stop:
            at = full.find(stop)
            if at >= 0:
                text, decoded = full[:at], full[: at + len(stop)]
        if approx_tokens(decoded) > max_new_tokens:
            text = full[: max_new_tokens * 4]
            return Generation(text, approx_tokens(text), "length")
        return Generation(text, approx_tokens(decoded), "stop")

    def answers(
        self, inputs: Sequence[str], max_new_tokens: int, stop: Stops = None
    ) -> list[Generation]:
        stops = per_input_stops(stop, len(inputs))
        return [self.answer(x, max_new_tokens, s) for x, s in zip(inputs, stops, strict=True)]

    async def generate(
        self, inputs: Sequence[str], max_new_tokens: int, stop: Stops = None
    ) -> list[Generation]:
        out = self.answers(inputs, max_new_tokens, stop)
        await asyncio.sleep(0)
        return out


class StandInBackend(HashReplayBackend):
    """A model of fixed per-batch cost: each call sleeps `a_ms + b_ms * len(inputs)`."""

    name = "standin"

    def __init__(self, outputs: Sequence[str], *, a_ms: float, b_ms: float) -> None:
        super().__init__(outputs)
        self.a_ms = a_ms
        self.b_ms = b_ms

    def cost_ms(self, batch_size: int) -> float:
        return self.a_ms + self.b_ms * batch_size

    async def generate(
        self, inputs: Sequence[str], max_new_tokens: int, stop: Stops = None
    ) -> list[Generation]:
        out = self.answers(inputs, max_new_tokens, stop)
        await asyncio.sleep(self.cost_ms(len(inputs)) / 1000)
        return out


@dataclass
class CallStats:
    calls: int = 0
    inputs: int = 0
    max_batch: int = 0


class Counting(Backend):
    """Delegates to `inner`, counting calls and inputs; `dump(path)` writes the counts.

    `salt`, when given, is appended to the revision, and so goes into every cache key: a worker
    with a fresh salt starts with a cold cache without touching anyone else's keys.

    It schedules as `inner` does (`batching`, a class attribute: an in-flight backend is wrapped
    in the subclass `_CountingInflight`), so that the guard's `auto` admission sees through it."""

    def __new__(cls, inner: Backend, salt: str = "") -> Counting:
        if cls is Counting and inner.batching == "inflight":
            cls = _CountingInflight
        return super().__new__(cls)

    def __init__(self, inner: Backend, salt: str = "") -> None:
        revision = f"{inner.revision}+bench-{salt}" if salt else inner.revision
        super().__init__(inner.model_id, revision)
        self.inner = inner
        self.name = inner.name
        self.stats = CallStats()

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def generate(
        self, inputs: Sequence[str], max_new_tokens: int, stop: Stops = None
    ) -> list[Generation]:
        self.stats.calls += 1
        self.stats.inputs += len(inputs)
        self.stats.max_batch = max(self.stats.max_batch, len(inputs))
        return await self.inner.generate(inputs, max_new_tokens, stop)

    def dump(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        """Write the counts (and `extra`) to `path` as JSON, atomically."""
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**asdict(self.stats), **(extra or {})}))
        tmp.replace(path)


class _CountingInflight(Counting):
    batching: ClassVar[Batching] = "inflight"
