"""The utilisation bench's workload: chat turns from the shared benchmarks, offered open loop.

A turn is a prompt event and, in the `pairs` mix, its response event one `RESPONSE_GAP_S`
later (the chat model answering), paired by `reply_to`. A prompt-only request is what early exit
cuts short (GuardReasoner stops before Task 2), a response request is generated in full: the
`pairs` mix is half each, the `prompts` mix prompt-only. Turns arrive as a Poisson process of a
fixed seed. Every text is distinct within a run (no cache hit, no dedupe), and each event knows
the exact model input and stop string the guard builds for it, so the engine alone can be fed
the very same requests at the very same times (`bench.sim_engine.open_loop`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from bench.data import ASSISTANT, HUMAN
from bench.sim_engine import Arrival
from engine.prompt import EARLY_EXIT_STOP, NO_RESPONSE, build_model_input

Mix = Literal["pairs", "prompts"]
MIXES: tuple[Mix, ...] = ("pairs", "prompts")
#: Seconds between a prompt event and its response event (the chat model's answer).
RESPONSE_GAP_S = 1.0


@dataclass(frozen=True, slots=True)
class Event:
    """One chat event to send at `at` seconds from the start of the run."""

    at: float
    id: str
    conversation: str
    text: str
    level: int  # which offered-load level it belongs to
    prompt: str | None = None  # a response event: its prompt's text (not sent; reply_to is)
    reply_to: str | None = None

    @property
    def is_response(self) -> bool:
        return self.reply_to is not None

    def value(self) -> bytes:
        """The event's JSON, stamped `created_at` now (the moment it is produced)."""
        body: dict[str, str] = {
            "id": self.id,
            "conversation_id": self.conversation,
            "text": self.text,
            "created_at": datetime.now(UTC).isoformat(),
        }
        if self.reply_to is not None:
            body["reply_to"] = self.reply_to
        return json.dumps(body).encode()

    def arrival(self, *, max_chars: int, early_exit: bool) -> Arrival:
        """What the guard hands the engine for this event (a cache miss), and when."""
        if self.prompt is None:
            model_input = build_model_input(self.text, None, max_chars=max_chars)
            return Arrival(self.at, model_input, EARLY_EXIT_STOP if early_exit else None)
        return Arrival(self.at, build_model_input(self.prompt, self.text, max_chars=max_chars))


def conversation_pairs(shared: Path) -> list[tuple[str, str]]:
    """(prompt, response) of the shared benchmark samples that have a response, one per prompt
    text, in file order."""
    pairs: dict[str, str] = {}
    for file in sorted((shared / "benchmark").glob("*.json")):
        for sample in json.loads(file.read_text(encoding="utf-8")):
            text = str(sample["input"])
            if HUMAN not in text or ASSISTANT not in text:
                continue
            prompt, response = text.split(HUMAN, 1)[1].split(ASSISTANT, 1)
            response = response.removesuffix("\n\n")
            if prompt.strip() and response.strip() and response != NO_RESPONSE:
                pairs.setdefault(prompt, response)
    if not pairs:
        raise SystemExit(f"bench: no prompt/response pairs in {shared / 'benchmark'}")
    return list(pairs.items())


class Workload:
    """Turns from `pairs` in an order shuffled by `seed` (the benchmark files differ in their
    texts' lengths: in file order the load would change with the file), numbered across the
    run so that no text repeats."""

    def __init__(
        self, pairs: Sequence[tuple[str, str]], mix: Mix, run: str, *, seed: int = 0
    ) -> None:
        if mix not in MIXES:
            raise ValueError(f"mix: expected one of {MIXES}, got {mix!r}")
        self.pairs, self.mix, self.run = list(pairs), mix, run
        random.Random(seed).shuffle(self.pairs)
        self.turns = 0

    @property
    def events_per_turn(self) -> int:
        return 2 if self.mix == "pairs" else 1

    def turn(self, at: float, level: int) -> list[Event]:
        k = self.turns
        self.turns += 1
        prompt, response = self.pairs[k % len(self.pairs)]
        if k >= len(self.pairs):
            prompt = f"{prompt} (#{k // len(self.pairs)})"
        conv, pid = f"{self.run}-c{k}", f"{self.run}-{k}p"
        events = [Event(at, pid, conv, prompt, level)]
        if self.mix == "pairs":
            events.append(
                Event(at + RESPONSE_GAP_S, f"{self.run}-{k}r", conv, response, level, prompt, pid)
            )
        return events

    def poisson(
        self, rate: float, seconds: float, *, start: float, level: int, rng: random.Random
    ) -> list[Event]:
        """Turns arriving at `rate` events/s on average for `seconds` from `start`."""
        events: list[Event] = []
        t = start + rng.expovariate(rate / self.events_per_turn)
        while t < start + seconds:
            events.extend(self.turn(t, level))
            t += rng.expovariate(rate / self.events_per_turn)
        return events

    def at_once(self, count: int, level: int = -1) -> list[Event]:
        """`count` events all due at 0 (their responses at 0 too): a saturating backlog."""
        events: list[Event] = []
        while len(events) < count:
            events.extend(
                Event(0.0, e.id, e.conversation, e.text, level, e.prompt, e.reply_to)
                for e in self.turn(0.0, level)
            )
        return events[:count]


def levels_schedule(
    workload: Workload, rates: Sequence[float], seconds: float, seed: int
) -> list[Event]:
    """One run of offered-load levels back to back (level i at `rates[i]` events/s for
    `seconds`), in send order."""
    rng = random.Random(seed)
    events: list[Event] = []
    for i, rate in enumerate(rates):
        events.extend(workload.poisson(rate, seconds, start=i * seconds, level=i, rng=rng))
    return sorted(events, key=lambda e: e.at)
