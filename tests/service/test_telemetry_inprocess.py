"""Traces and metrics of the pipeline, in process: the real Processor, Guard, batcher, replay
backend and an in-memory verdict cache, fed Faust-shaped events with W3C headers; spans land in
the SDK's InMemorySpanExporter, metrics in its InMemoryMetricReader."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from engine.backends.replay import ReplayBackend
from engine.cache import MemoryVerdictCache
from engine.guard import Guard
from service.config import Settings
from service.messages import Outgoing
from service.pairing import PromptStore
from service.pipeline import Processor
from service.telemetry import Telemetry
from tests.service.conftest import replay_folder, samples


@dataclass
class Msg:
    topic: str
    partition: int
    offset: int
    timestamp: float = 0.0


@dataclass
class Event:
    key: bytes | None
    value: bytes
    message: Msg
    headers: dict[str, bytes] = field(default_factory=dict)


def traceparent(n: int) -> tuple[str, str, bytes]:
    trace_id, span_id = f"{n:032x}", f"{n + 0xA000:016x}"
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01".encode()


class Out:
    """The fake producer: records every Outgoing and acks it at once."""

    def __init__(self) -> None:
        self.records: list[Outgoing] = []
        self.acked: list[Any] = []

    async def send(self, rec: Outgoing) -> asyncio.Future[None]:
        self.records.append(rec)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    async def ack(self, event: Any) -> None:
        self.acked.append(event)

    def on(self, topic: str) -> list[Outgoing]:
        return [r for r in self.records if r.topic == topic]


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    out: dict[str, list[Any]] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


def value(points: dict[str, list[Any]], name: str, **attrs: Any) -> Any:
    found = [p for p in points.get(name, []) if dict(p.attributes) == attrs]
    assert len(found) == 1, (name, attrs, [dict(p.attributes) for p in points.get(name, [])])
    return found[0].value if hasattr(found[0], "value") else found[0]


def header(rec: Outgoing, name: str) -> bytes | None:
    return dict(rec.headers).get(name)


class Rig:
    def __init__(self, tmp_path: Path, shared_dir: Path, *, tracing: bool, **more: Any) -> None:
        folder = replay_folder(tmp_path, shared_dir, "1B", ["AegisSafetyTest", "HarmBenchResponse"])
        self.settings = Settings(
            replay_path=folder,
            topic_prompts="in.prompts",
            topic_responses="in.responses",
            topic_verdicts="out.verdicts",
            topic_flagged="out.flagged",
            topic_dlq="out.dlq",
            metrics_exporter="none",
            max_new_tokens=4096,
            **more,
        )
        self.spans = InMemorySpanExporter()
        self.reader = InMemoryMetricReader()
        self.telemetry = Telemetry(
            self.settings,
            span_exporter=self.spans if tracing else None,
            metric_readers=[self.reader],
        )
        self.guard = Guard(
            ReplayBackend(folder),
            cache=MemoryVerdictCache(),
            max_batch_size=32,
            max_wait_ms=20,
            max_new_tokens=4096,
            on_batch=self.telemetry.metrics.on_batch,
            tracer=self.telemetry.tracer,
        )
        self.telemetry.metrics.watch_guard(self.guard)
        self.out = Out()
        store = PromptStore({}, lambda *a: None, ttl_s=60, max_entries=100)
        self.processor = Processor(
            self.settings,
            self.guard,
            store,
            self.out.send,
            engine_name="replay",
            telemetry=self.telemetry,
        )
        self.offset = 0

    def event(self, topic: str, body: dict[str, Any] | bytes, n: int | None) -> Event:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"traceparent": traceparent(n)[2], "tracestate": b"chat=1"} if n else {}
        self.offset += 1
        return Event(b"c", raw, Msg(topic, 0, self.offset, timestamp=1.0), headers)

    async def feed(self, events: list[Event]) -> None:
        for ev in events:
            if ev.message.topic == self.settings.topic_prompts:
                await self.processor.on_prompt(ev, self.out.ack)
            else:
                await self.processor.on_response(ev, self.out.ack)
        for lane in self.processor._lanes.values():
            await asyncio.wait_for(lane.wait_idle(), 30)


def _wave_one(rig: Rig, shared_dir: Path) -> tuple[list[Event], list[dict[str, str]]]:
    aegis = samples(shared_dir, "1B", "AegisSafetyTest")
    rows = [aegis[i] for i in (0, 1, 4, 5)]  # gold: unharmful, unharmful, harmful, harmful
    answer = next(r for r in samples(shared_dir, "1B", "HarmBenchResponse") if r["response"])
    p = rig.settings.topic_prompts
    events = [
        rig.event(p, {"id": f"p{i}", "conversation_id": "c", "text": r["prompt"]}, i + 1)
        for i, r in enumerate(rows)
    ]
    # p4 repeats p0's text in the same batch (deduplicated), then a poison message
    events.append(rig.event(p, {"id": "p4", "conversation_id": "c", "text": rows[0]["prompt"]}, 5))
    events.append(rig.event(p, b"{not json", 6))
    body = {
        "id": "r0",
        "conversation_id": "c",
        "reply_to": "x",
        "text": answer["response"],
        "prompt": answer["prompt"],
        "created_at": "2020-01-01T00:00:00Z",
    }
    events.append(rig.event(rig.settings.topic_responses, body, 7))
    return events, rows


@pytest.fixture
async def traced(tmp_path: Path, shared_dir: Path) -> Rig:
    rig = Rig(tmp_path, shared_dir, tracing=True)
    await rig.guard.start()
    return rig


async def test_trace_continues_through_the_guard(traced: Rig, shared_dir: Path) -> None:
    rig = traced
    events, rows = _wave_one(rig, shared_dir)
    await rig.feed(events)
    # a second wave: p1's text again, now answered by the cache
    await rig.feed(
        [
            rig.event(
                rig.settings.topic_prompts,
                {"id": "p5", "conversation_id": "c", "text": rows[1]["prompt"]},
                8,
            )
        ]
    )
    spans = rig.spans.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}

    def children(parent: ReadableSpan) -> dict[str, list[ReadableSpan]]:
        out: dict[str, list[ReadableSpan]] = {}
        for s in spans:
            if s.parent is not None and s.parent.span_id == parent.context.span_id:
                out.setdefault(s.name, []).append(s)
        return out

    messages = {s.context.trace_id: s for s in spans if s.name == "guardstream.message"}
    assert len(messages) == 8
    verdicts = rig.out.on(rig.settings.topic_verdicts)
    assert len(verdicts) == 7  # 6 prompts + 1 response; the poison went to the DLQ
    for rec in verdicts:
        trace_id, _, sent = traceparent(int(json.loads(rec.value)["source"]["offset"]))
        parent_header = header(rec, "traceparent")
        assert parent_header is not None and header(rec, "tracestate") == b"chat=1"
        _, out_trace, out_span, _ = parent_header.decode().split("-")
        assert out_trace == trace_id  # the same trace goes on downstream
        produce = by_id[int(out_span, 16)]
        assert produce.name == "guardstream.produce" and produce.kind == SpanKind.PRODUCER
        message = messages[int(trace_id, 16)]
        assert produce.parent is not None and produce.parent.span_id == message.context.span_id
        # the message span continues the chat service's span from the input's header
        assert message.parent is not None and message.parent.is_remote
        assert message.parent.span_id == int(sent.decode().split("-")[2], 16)
        assert message.kind == SpanKind.CONSUMER
        names = children(message)
        assert {"guardstream.parse", "guardstream.cache_lookup", "guardstream.produce"} <= set(
            names
        ), names
        hit = names["guardstream.cache_lookup"][0].attributes["guardstream.cache.hit"]
        source_id = json.loads(rec.value)["source_id"]
        assert hit is (source_id == "p5")
        # a hit is answered by its lookup and never waits for a model batch
        assert ("guardstream.batch_wait" in names) is (not hit), names
        if not hit:
            (gen,) = names["guardstream.generate"]
            (link,) = gen.links
            batch_gen = by_id[link.context.span_id]
            assert batch_gen.name == "guardstream.generate"
            assert batch_gen.parent is not None
            assert by_id[batch_gen.parent.span_id].name == "guardstream.batch"
        else:
            assert "guardstream.generate" not in names

    lookups = [s for s in spans if s.name == "guardstream.lookup"]
    assert lookups and all(s.parent is None for s in lookups)
    looked_up = {link.context.span_id for s in lookups for link in s.links}
    assert looked_up == {m.context.span_id for t, m in messages.items() if t != 6}
    batches = [s for s in spans if s.name == "guardstream.batch"]
    assert len(batches) == 1  # wave one; p5 was a hit and made no model batch
    first = batches[0]
    assert first.parent is None  # a trace of its own, linked to its messages
    linked = {link.context.span_id for link in first.links}
    wave_one = {m.context.span_id for t, m in messages.items() if t <= 7 and t != 6}
    assert linked == wave_one  # every message, the deduplicated p4 included
    assert first.attributes["guardstream.batch.size"] == 5  # p0..p3 + r0 distinct
    assert first.attributes["guardstream.batch.messages"] == 6

    # the poison message: an error span, and its dead letter carries the trace on
    poison = messages[6]
    assert poison.status.status_code == StatusCode.ERROR
    assert poison.attributes["guardstream.dead_letter.reason"] == "not_json"
    (letter,) = rig.out.on(rig.settings.topic_dlq)
    assert header(letter, "traceparent") is not None
    assert header(letter, "traceparent").decode().split("-")[1] == f"{6:032x}"  # type: ignore[union-attr]
    assert set(children(poison)) == {"guardstream.parse", "guardstream.produce"}


async def test_counters_move_by_the_stream(traced: Rig, shared_dir: Path) -> None:
    rig = traced
    events, rows = _wave_one(rig, shared_dir)
    await rig.feed(events)
    await rig.feed(
        [
            rig.event(
                rig.settings.topic_prompts,
                {"id": "p5", "conversation_id": "c", "text": rows[1]["prompt"]},
                8,
            )
        ]
    )
    points = metric_points(rig.reader)
    assert value(points, "guardstream_messages_consumed", topic="in.prompts") == 7
    assert value(points, "guardstream_messages_consumed", topic="in.responses") == 1
    assert value(points, "guardstream_cache_misses") == 5  # p0..p3, r0 (p4 joined p0)
    assert value(points, "guardstream_cache_hits") == 1  # p5
    assert value(points, "guardstream_dead_letters", reason="not_json") == 1
    published = [json.loads(r.value) for r in rig.out.on(rig.settings.topic_verdicts)]
    flagged = rig.out.on(rig.settings.topic_flagged)
    assert 0 < len(flagged) < len(published)  # the stream holds both
    prompts_flagged = sum(1 for v in published if v["flagged"] and v["kind"] == "prompt")
    assert value(points, "guardstream_flagged", kind="prompt") == prompts_flagged
    assert value(points, "guardstream_flagged", kind="prompt") + value(
        points, "guardstream_flagged", kind="response"
    ) == len(flagged)
    assert 0 < prompts_flagged < 6  # the prompts hold both
    for label in ("harmful", "unharmful"):
        want = sum(
            1 for v in published if v["kind"] == "prompt" and v["verdict"]["request"] == label
        )
        got = value(
            points, "guardstream_verdict_labels", kind="prompt", task="request", label=label
        )
        assert got == want
    r0 = next(v for v in published if v["kind"] == "response")
    label = r0["verdict"]["response"] or "none"
    assert (
        value(points, "guardstream_verdict_labels", kind="response", task="response", label=label)
        == 1
    )
    total = sum(p.value for p in points["guardstream_verdicts"])
    assert total == 7
    assert value(points, "guardstream_tokens_generated") == rig.guard.stats.tokens > 0
    assert value(points, "guardstream_engine_errors") == 0
    # the prompts stopped at Task 2 (early exit is on by default)
    assert value(points, "guardstream_early_exits") == rig.guard.stats.early_exits > 0
    assert value(points, "guardstream_early_exit_regenerated") == rig.guard.stats.regenerated
    sizes = value(points, "guardstream_batch_size")
    assert (sizes.count, sizes.sum) == (1, 5)  # 5 distinct misses; wave two's hit made none
    assert value(points, "guardstream_batch_wait").count == 5  # p4 joined p0 at its lookup
    assert value(points, "guardstream_generation_latency").count == 1  # wave two was all hits
    e2e = {dict(p.attributes)["kind"]: p for p in points["guardstream_end_to_end_latency"]}
    assert e2e["prompt"].count == 6 and e2e["response"].count == 1
    # r0 was created in 2020: its age is years; prompts' Kafka timestamp (1 s after epoch) too
    assert e2e["response"].min > 3600 * 24 * 365


async def test_tracing_off_passes_the_context_through(tmp_path: Path, shared_dir: Path) -> None:
    rig = Rig(tmp_path, shared_dir, tracing=False)
    await rig.guard.start()
    assert rig.telemetry.tracer is None and rig.guard._tracing is None
    events, _ = _wave_one(rig, shared_dir)
    await rig.feed(events)
    for rec in rig.out.records:
        source = json.loads(rec.value)["source"]
        assert header(rec, "traceparent") == traceparent(source["offset"])[2]
        assert header(rec, "tracestate") == b"chat=1"
    # no header in: none out
    await rig.feed(
        [
            rig.event(
                rig.settings.topic_prompts,
                {"id": "q", "conversation_id": "c", "text": "hello"},
                None,
            )
        ]
    )
    assert header(rig.out.records[-1], "traceparent") is None
    points = metric_points(rig.reader)
    assert value(points, "guardstream_messages_consumed", topic="in.prompts") == 7


@pytest.mark.parametrize("content", [False, True])
async def test_message_text_is_logged_only_when_asked(
    tmp_path: Path, shared_dir: Path, caplog: pytest.LogCaptureFixture, content: bool
) -> None:
    rig = Rig(tmp_path, shared_dir, tracing=True, log_content=content)
    await rig.guard.start()
    events, rows = _wave_one(rig, shared_dir)
    with caplog.at_level(logging.DEBUG, logger="guardstream.messages"):
        await rig.feed(events)
    lines = {r.message_id: r for r in caplog.records if r.getMessage() == "verdict published"}  # type: ignore[attr-defined]
    assert sorted(lines) == ["p0", "p1", "p2", "p3", "p4", "r0"]
    p2 = lines["p2"]
    assert p2.trace_id == traceparent(3)[0] and p2.offset == 3  # type: ignore[attr-defined]
    assert getattr(p2, "text", None) == (rows[2]["prompt"] if content else None)


class _Gated(ReplayBackend):
    """The replay, except that an input holding `slow` waits for `gate`."""

    def __init__(self, path: Path, slow: str) -> None:
        super().__init__(path)
        self.slow, self.gate, self.holding = slow, asyncio.Event(), asyncio.Event()

    async def generate(self, inputs: Any, max_new_tokens: int, stop: Any = None) -> Any:
        if any(self.slow in text for text in inputs):
            self.holding.set()
            await self.gate.wait()
        return await super().generate(inputs, max_new_tokens, stop)


async def test_latency_is_to_the_verdict_being_ready_and_the_order_wait_is_a_header(
    tmp_path: Path, shared_dir: Path
) -> None:
    rig = Rig(tmp_path, shared_dir, tracing=False)
    aegis = samples(shared_dir, "1B", "AegisSafetyTest")
    gated = _Gated(rig.settings.replay_path, aegis[0]["prompt"])  # type: ignore[arg-type]
    rig.guard.backend = gated
    p = rig.settings.topic_prompts
    first = rig.event(p, {"id": "slow", "conversation_id": "c", "text": aegis[0]["prompt"]}, None)
    second = rig.event(p, {"id": "fast", "conversation_id": "c", "text": aegis[1]["prompt"]}, None)
    await rig.processor.on_prompt(first, rig.out.ack)
    await asyncio.wait_for(gated.holding.wait(), 5)
    await rig.processor.on_prompt(second, rig.out.ack)
    await asyncio.sleep(0.3)  # the second verdict is ready; it waits behind the first's offset
    gated.gate.set()
    for lane in rig.processor._lanes.values():
        await asyncio.wait_for(lane.wait_idle(), 30)
    records = {json.loads(r.value)["source_id"]: r for r in rig.out.on("out.verdicts")}
    fast = records["fast"]
    assert float(header(fast, "guardstream-order-wait-ms") or 0) >= 250
    assert json.loads(fast.value)["latency_ms"] < 250, "latency is to readiness, not publishing"
    assert float(header(records["slow"], "guardstream-order-wait-ms") or b"x") < 250
    await rig.guard.close()
