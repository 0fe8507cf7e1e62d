"""A chat stream as users send it, for the group tests: prompts of the prompt benchmarks, and for
every response of the response benchmarks its prompt first and then the response, half with the
prompt inline, half by `reply_to`; F1 per benchmark from the verdicts against `evaluate`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from engine.backends.replay import ReplayBackend
from engine.evaluation import BENCHMARKS, backend_generate, evaluate, load_prediction_samples, score
from engine.prompt import split_model_input

PROMPT_SETS = ["SimpleSafetyTests", "AegisSafetyTest", "HarmBenchPrompt"]
RESPONSE_SETS = ["HarmBenchResponse", "XSTestReponseHarmful"]
ALL_SETS = PROMPT_SETS + RESPONSE_SETS


@dataclass
class PairedStream:
    #: (topic kind, key, value) in the order they are produced: a response after its prompt.
    events: list[tuple[str, bytes, bytes]] = field(default_factory=list)
    gold: dict[str, dict[str, str]] = field(default_factory=dict)  # benchmark -> id -> label
    expected_f1: dict[str, float] = field(default_factory=dict)
    by_reply_to: set[str] = field(default_factory=set)  # response ids paired through the table

    @property
    def ids(self) -> set[str]:
        return {json.loads(v)["id"] for _, _, v in self.events}


async def build_stream(folder: Path, names: Sequence[str] = ALL_SETS) -> PairedStream:
    benchmarks = {b.name: b for b in BENCHMARKS}
    backend = ReplayBackend(folder)
    await backend.start()
    out = PairedStream()
    n = 0
    for name in names:
        bench = benchmarks[name]
        samples = load_prediction_samples(folder / f"{name}.jsonl", bench)
        generate = backend_generate(backend, 4096)
        # as the worker does by default: prompt-only requests stop at Task 2 (early exit)
        result = await evaluate(bench, samples, generate, rule="project", early_exit=True)
        out.expected_f1[name] = result.score.f1
        out.gold[name] = {}
        for i, sample in enumerate(samples):
            prompt, response = split_model_input(sample.model_input)
            sid = f"{name}-{i}"
            out.gold[name][sid] = sample.gold
            conv = f"conv-{n % 211}"
            n += 1
            if response is None:
                body = {"id": sid, "conversation_id": conv, "text": prompt}
                out.events.append(("prompts", conv.encode(), json.dumps(body).encode()))
                continue
            pid = f"p-{sid}"
            body = {"id": pid, "conversation_id": conv, "text": prompt}
            out.events.append(("prompts", conv.encode(), json.dumps(body).encode()))
            answer: dict[str, Any] = {
                "id": sid,
                "conversation_id": conv,
                "reply_to": pid,
                "text": response,
            }
            if i % 2:
                answer["prompt"] = prompt
            else:
                out.by_reply_to.add(sid)
            out.events.append(("responses", conv.encode(), json.dumps(answer).encode()))
    # Interleave the benchmarks' conversations as live traffic does, keeping each response
    # after its prompt (the order within a conversation's events is kept).
    return out


async def produce_stream(
    bootstrap: str,
    topics: dict[str, str],
    events: Sequence[tuple[str, bytes, bytes]],
    *,
    chunk: int = 200,
    pause_s: float = 0.0,
) -> None:
    """Produce in order (one producer, so a response's timestamp is after its prompt's), in
    chunks with an optional pause between them (a stream that lasts, for joins mid-way)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for start in range(0, len(events), chunk):
            futures = [
                await producer.send(topics[kind], value, key=key)
                for kind, key, value in events[start : start + chunk]
            ]
            await asyncio.gather(*futures)
            if pause_s:
                await asyncio.sleep(pause_s)
    finally:
        await producer.stop()


def stream_f1(stream: PairedStream, verdicts: Sequence[dict[str, Any]]) -> dict[str, float]:
    benchmarks = {b.name: b for b in BENCHMARKS}
    by_id = {v["source_id"]: v for v in verdicts}
    out = {}
    for name, gold in stream.gold.items():
        task = benchmarks[name].task
        sids = list(gold)
        predicted = [by_id[s]["verdict"][task] for s in sids]
        out[name] = score([gold[s] for s in sids], predicted, task, "honest").f1
    return out
