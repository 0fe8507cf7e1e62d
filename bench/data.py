"""The bench's input: prompt texts from the shared GuardReasoner benchmarks, and recorded outputs.

The shared data is read where it lies (never copied): `--shared DIR`, else
`$GUARDSTREAM_SHARED_DIR`, else `../shared/guardreasoner` next to the repository.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
HUMAN = "Human user:\n"
ASSISTANT = "\n\nAI assistant:\n"


def shared_dir(option: str | None) -> Path:
    """The shared GuardReasoner folder; raises SystemExit with a clear message when absent."""
    raw = option or os.environ.get("GUARDSTREAM_SHARED_DIR")
    path = Path(raw) if raw else REPO_ROOT.parent / "shared" / "guardreasoner"
    if not (path / "benchmark").is_dir() or not (path / "predictions").is_dir():
        raise SystemExit(
            f"bench: GuardReasoner reference data not found at {path} "
            "(give --shared DIR or set GUARDSTREAM_SHARED_DIR)"
        )
    return path


def benchmark_prompts(shared: Path) -> list[str]:
    """Every distinct user prompt of the shared benchmarks, in file order."""
    seen: dict[str, None] = {}
    for file in sorted((shared / "benchmark").glob("*.json")):
        for sample in json.loads(file.read_text(encoding="utf-8")):
            text = str(sample["input"])
            if HUMAN not in text:
                continue
            prompt = text.split(HUMAN, 1)[1].split(ASSISTANT, 1)[0]
            if prompt.strip():
                seen.setdefault(prompt, None)
    if not seen:
        raise SystemExit(f"bench: no prompts in {shared / 'benchmark'}")
    return list(seen)


def recorded_outputs(folder: Path) -> list[str]:
    """The generated texts recorded in `folder` (`*.jsonl` with a `predict` field, such as
    `predictions/1B` of the shared data): what the stand-ins answer with."""
    outputs: list[str] = []
    for file in sorted(folder.glob("*.jsonl")):
        # split on newlines only: the texts hold other Unicode line separators
        for line in file.read_text(encoding="utf-8").split("\n"):
            if line.strip():
                outputs.append(str(json.loads(line)["predict"]))
    if not outputs:
        raise SystemExit(f"bench: no recorded outputs in {folder}")
    return outputs


@dataclass(frozen=True, slots=True)
class Message:
    """One prompt event to send: its id, Kafka key and text (the JSON is made at send time, so
    that `created_at` is the moment it was produced)."""

    id: str
    key: bytes
    text: str

    def value(self) -> bytes:
        now = datetime.now(UTC).isoformat()
        return json.dumps(
            {
                "id": self.id,
                "conversation_id": self.key.decode(),
                "text": self.text,
                "created_at": now,
            }
        ).encode()


def unique_stream(prompts: Sequence[str], n: int, run: str) -> list[Message]:
    """`n` messages with distinct texts: the benchmark prompts in order, then again with a
    ` (#k)` suffix per round, so that no two messages share a text (no cache hit, no dedupe)."""
    out = []
    for i in range(n):
        text = prompts[i % len(prompts)]
        rnd = i // len(prompts)
        if rnd:
            text = f"{text} (#{rnd})"
        out.append(Message(f"{run}-{i}", f"{run}-c{i}".encode(), text))
    return out


def repeat_stream(
    prompts: Sequence[str], n: int, run: str, fraction: float, *, hot: int = 50, seed: int = 7
) -> list[Message]:
    """`n` messages of which about `fraction` repeat a text from a small hot set (live chat's
    greetings and spam: `hot` texts, Zipf-like popularity) and the rest are distinct."""
    rng = random.Random(seed)
    hot_texts = prompts[-hot:]
    weights = [1.0 / (rank + 1) for rank in range(len(hot_texts))]
    fresh = iter(unique_stream(prompts[:-hot], n, run))
    out = []
    for i in range(n):
        if rng.random() < fraction:
            text = rng.choices(hot_texts, weights)[0]
            out.append(Message(f"{run}-{i}", f"{run}-c{i}".encode(), text))
        else:
            m = next(fresh)
            out.append(Message(f"{run}-{i}", f"{run}-c{i}".encode(), m.text))
    return out
