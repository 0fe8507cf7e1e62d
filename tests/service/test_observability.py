"""Observability of a real worker (subprocess) against the local Kafka and a Redis of the test's
own: trace context through Kafka headers and the console exporter's spans, `/metrics` after a
known stream, JSON log lines without message text or secrets, `/readyz` with Redis stopped."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from tests.service.conftest import replay_folder, samples
from tests.service.harness import Worker, consume, free_port, topic_env, values

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REDIS_SERVER = "/usr/bin/redis-server"
REDIS_PASSWORD = "redis-Secret-9931"
SASL_PASSWORD = "sasl-Secret-4417"
API_KEY = "sk-test-Secret-7702"


class RedisServer:
    """A redis-server of this test alone (optionally with a password), which it may stop."""

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.workdir)]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                import socket

                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on {self.port} did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, REDIS_PASSWORD)
    server.start()
    yield server
    server.stop()


def tp(n: int) -> tuple[str, str, bytes]:
    trace_id, span_id = f"{0xC0FFEE:08x}{n:024x}", f"{0xBEEF0000 + n:016x}"
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01".encode()


async def produce_with_headers(
    bootstrap: str, topic: str, records: list[tuple[bytes, bytes, int | None]]
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value, n in records:
            headers = [("traceparent", tp(n)[2])] if n is not None else []
            await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()


def scrape(worker: Worker) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    url = f"http://127.0.0.1:{worker.port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        ctype, text = resp.headers["Content-Type"], resp.read().decode()
    samples_: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples_[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return ctype, samples_


def metric(scraped: dict[Any, float], name: str, **labels: str) -> float | None:
    return scraped.get((name, tuple(sorted(labels.items()))))


def log_lines(path: Path) -> list[dict[str, Any]]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line is JSON: log or span


def _body(pid: str, text: str, **more: Any) -> bytes:
    return json.dumps({"id": pid, "conversation_id": "conv", "text": text, **more}).encode()


async def test_trace_metrics_and_logs_of_a_known_stream(
    tmp_path: Path,
    shared_dir: Path,
    base_env: dict[str, str],
    kafka_bootstrap: str,
    own_redis: RedisServer,
) -> None:
    aegis = samples(shared_dir, "1B", "AegisSafetyTest")
    rows = [aegis[i] for i in (0, 1, 4, 5)]
    answer = next(r for r in samples(shared_dir, "1B", "HarmBenchResponse") if r["response"])
    folder = replay_folder(tmp_path, shared_dir, "1B", ["AegisSafetyTest", "HarmBenchResponse"])
    env = {
        **base_env,
        "GUARDSTREAM_REPLAY_PATH": str(folder),
        "GUARDSTREAM_REDIS_URL": own_redis.url,
        "GUARDSTREAM_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
        "GUARDSTREAM_OPENAI_API_KEY": API_KEY,
        "GUARDSTREAM_TRACES_EXPORTER": "console",
        "GUARDSTREAM_LOG_LEVEL": "DEBUG",
        "GUARDSTREAM_MAX_NEW_TOKENS": "4096",
    }
    prompts, responses = env["GUARDSTREAM_TOPIC_PROMPTS"], env["GUARDSTREAM_TOPIC_RESPONSES"]
    wave_one = [(b"conv", _body(f"p{i}", r["prompt"]), i + 1) for i, r in enumerate(rows)]
    wave_one += [(b"conv", b"{not json", 5), (b"conv", b'{"id": "x", "text": 5}', 6)]
    response = _body("r0", answer["response"] or "", reply_to="nope", prompt=answer["prompt"])
    worker = Worker(env, tmp_path / "worker.log")
    worker.start()
    try:
        await produce_with_headers(kafka_bootstrap, prompts, wave_one)
        await produce_with_headers(kafka_bootstrap, responses, [(b"conv", response, 7)])
        topic_v = env["GUARDSTREAM_TOPIC_VERDICTS"]
        await consume(kafka_bootstrap, topic_v, 5, timeout=60, settle=0.5)
        # wave two: p1's text again, from the cache now
        await produce_with_headers(
            kafka_bootstrap, prompts, [(b"conv", _body("p9", rows[1]["prompt"]), 9)]
        )
        records = await consume(kafka_bootstrap, topic_v, 6, timeout=60)
        n_flagged = sum(1 for v in values(records) if v["flagged"])
        topic_f = env["GUARDSTREAM_TOPIC_FLAGGED"]
        flagged = values(await consume(kafka_bootstrap, topic_f, n_flagged, timeout=30))
        deadline = time.monotonic() + 20
        while True:  # consumer lag is refreshed every 5 s
            ctype, scraped = scrape(worker)
            lag = [v for (n, labels), v in scraped.items() if n == "guardstream_consumer_lag"]
            if (len(lag) == 8 and not any(lag)) or time.monotonic() > deadline:
                break
            await asyncio.sleep(1)
        health = worker.get("/healthz")
    finally:
        worker.stop()
    published = values(records)
    assert sorted(v["source_id"] for v in published) == ["p0", "p1", "p2", "p3", "p9", "r0"]

    # --- the trace goes on: Kafka header in, Kafka header out, spans in between ---------------
    lines = log_lines(tmp_path / "worker.log")
    spans = [s for s in lines if "context" in s and s.get("name", "").startswith("guardstream.")]
    by_id = {s["context"]["span_id"]: s for s in spans}
    for rec in records:
        v = json.loads(rec.value)
        n = {"p9": 9, "r0": 7}.get(v["source_id"]) or int(v["source_id"][1:]) + 1
        trace_id, sent_span, _ = tp(n)
        out = dict(rec.headers)["traceparent"].decode().split("-")
        assert out[1] == trace_id, "the verdict continues the input's trace"
        produce = by_id[f"0x{out[2]}"]
        assert produce["name"] == "guardstream.produce"
        message = by_id[produce["parent_id"]]
        assert message["name"] == "guardstream.message"
        assert message["parent_id"] == f"0x{sent_span}"  # child of the chat service's span
        kids = {s["name"] for s in spans if s["parent_id"] == message["context"]["span_id"]}
        assert {"guardstream.parse", "guardstream.cache_lookup", "guardstream.produce"} <= kids
        # a hit is answered by its lookup batch; only a miss waits for and joins a model batch
        for model_side in ("guardstream.batch_wait", "guardstream.generate"):
            assert (model_side in kids) is (not v["cached"]), (model_side, v["source_id"])

        def linked_from(name: str) -> set[str]:
            return {
                link["context"]["span_id"]
                for s in spans
                if s["name"] == name
                for link in s["links"]
            }

        assert message["context"]["span_id"] in linked_from("guardstream.lookup")
        in_batch = message["context"]["span_id"] in linked_from("guardstream.batch")
        assert in_batch is (not v["cached"])

    # --- /metrics: Prometheus text, the stream's counts ------------------------------------
    assert ctype.startswith("text/plain") and "version=" in ctype
    assert metric(scraped, "guardstream_messages_consumed_total", topic=prompts) == 7
    assert metric(scraped, "guardstream_messages_consumed_total", topic=responses) == 1
    assert metric(scraped, "guardstream_cache_misses_total") == 5
    assert metric(scraped, "guardstream_cache_hits_total") == 1
    assert metric(scraped, "guardstream_dead_letters_total", reason="not_json") == 1
    assert metric(scraped, "guardstream_dead_letters_total", reason="invalid") == 1
    for kind in ("prompt", "response"):
        want = sum(1 for v in flagged if v["kind"] == kind)
        assert metric(scraped, "guardstream_flagged_total", kind=kind) == want
    assert 0 < len(flagged) < 6
    for label in ("harmful", "unharmful"):
        want = sum(
            1 for v in published if v["kind"] == "prompt" and v["verdict"]["request"] == label
        )
        got = metric(
            scraped, "guardstream_verdict_labels_total", kind="prompt", task="request", label=label
        )
        assert (got or 0) == want
    assert metric(scraped, "guardstream_end_to_end_latency_seconds_count", kind="prompt") == 5
    assert metric(scraped, "guardstream_end_to_end_latency_seconds_count", kind="response") == 1
    # the five misses waited for a model batch; the hit was answered by its cache lookup
    assert metric(scraped, "guardstream_batch_wait_seconds_count") == 5
    assert (metric(scraped, "guardstream_tokens_generated_total") or 0) > 0
    assert metric(scraped, "guardstream_engine_errors_total") == 0
    assert metric(scraped, "guardstream_cache_degraded") == 0
    assert metric(scraped, "guardstream_batches_in_flight") == 0
    assert sorted(lag) == [0] * 8, "4 partitions of each input topic, all caught up"

    # --- liveness --------------------------------------------------------------------------
    assert health[0] == 200 and json.loads(health[1])["status"] == "ok"

    # --- logs: JSON, ids, no text, no secrets ------------------------------------------------
    logs = [line for line in lines if "level" in line]
    text = (tmp_path / "worker.log").read_text()
    for secret in (REDIS_PASSWORD, SASL_PASSWORD, API_KEY):
        assert secret not in text
    start = next(line for line in logs if line["message"].startswith("starting:"))
    assert f"redis=redis://:***@127.0.0.1:{own_redis.port}/0" in start["message"]
    for r in [*rows, answer]:
        for chunk in (r["prompt"][:40], (r["response"] or "")[:40]):
            assert not chunk or chunk not in text, "message text must not be logged"
    published_lines = {
        line["message_id"]: line for line in logs if line["message"] == "verdict published"
    }
    assert sorted(published_lines) == ["p0", "p1", "p2", "p3", "p9", "r0"]
    p2 = published_lines["p2"]
    assert p2["trace_id"] == tp(3)[0] and p2["conversation_id"] == "conv"
    assert p2["topic"] == prompts and "text" not in p2
    dead = [line for line in logs if line["message"].startswith("dead letter")]
    assert {line["reason"] for line in dead} == {"not_json", "invalid"}
    assert {line["trace_id"] for line in dead} == {tp(5)[0], tp(6)[0]}


def _readyz(worker: Worker) -> tuple[int, dict[str, Any]]:
    status, body = worker.get("/readyz")
    return status, json.loads(body) if body else {}


async def test_readyz_follows_redis_when_the_cache_is_required(
    tmp_path: Path, shared_dir: Path, base_env: dict[str, str]
) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    folder = replay_folder(tmp_path, shared_dir, "1B", ["SimpleSafetyTests"])
    common = {
        **base_env,
        "GUARDSTREAM_REPLAY_PATH": str(folder),
        "GUARDSTREAM_REDIS_URL": redis.url,
    }
    required = Worker(
        {**common, **topic_env(uuid.uuid4().hex[:10]), "GUARDSTREAM_CACHE_REQUIRED": "true"},
        tmp_path / "required.log",
    )
    optional = Worker({**common, "GUARDSTREAM_CACHE_REQUIRED": "false"}, tmp_path / "optional.log")
    try:
        required.start()
        optional.start()
        assert _readyz(required)[1]["cache"] == {
            "enabled": True,
            "required": True,
            "state": "closed",
            "degraded": False,
        }
        redis.stop()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r, o = _readyz(required), _readyz(optional)
            if r[0] == 503 and o[1].get("cache", {}).get("degraded"):
                break
            await asyncio.sleep(0.5)
        status, body = _readyz(required)
        assert status == 503, body
        assert body["cache_ok"] is False and body["engine_loaded"] and body["kafka_joined"]
        assert body["cache"]["degraded"] is True and body["cache"]["state"] != "closed"
        status, body = _readyz(optional)
        assert status == 200, body  # optional cache: degraded, still ready
        assert body["ready"] is True and body["cache"]["degraded"] is True
        _, scraped = scrape(optional)
        assert metric(scraped, "guardstream_cache_degraded") == 1
        assert (metric(scraped, "guardstream_cache_state_changes_total", state="open") or 0) >= 1
        # Redis back: ready again once the breaker's probe succeeds
        redis.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _readyz(required)[0] != 200:
            await asyncio.sleep(0.5)
        assert _readyz(required)[0] == 200
    finally:
        required.stop()
        optional.stop()
        redis.stop()
    logs = log_lines(tmp_path / "required.log")
    changes = [line for line in logs if line.get("cache_state")]
    assert [c["cache_state"] for c in changes][:1] == ["open"]
    assert "closed" in [c["cache_state"] for c in changes]


async def test_replicas_beyond_the_partitions_are_ready_hot_spares(
    tmp_path: Path, shared_dir: Path, base_env: dict[str, str]
) -> None:
    """Three workers of one group on single-partition topics: one holds the input partitions,
    one at most a standby of the prompt table, the third nothing. All three must be ready (a
    Kubernetes rollout waits for readiness), and each says how many partitions it holds."""
    env = {
        **base_env,
        **topic_env(uuid.uuid4().hex[:10]),
        "GUARDSTREAM_REPLAY_PATH": str(
            replay_folder(tmp_path, shared_dir, "1B", ["SimpleSafetyTests"])
        ),
        "GUARDSTREAM_TOPIC_PARTITIONS": "1",
        "GUARDSTREAM_CACHE_ENABLED": "false",
    }
    workers = [Worker(env, tmp_path / f"worker{i}.log") for i in range(3)]
    try:
        for worker in workers:
            worker.start(timeout=90)  # raises unless /readyz answers 200
        # the last join rebalanced the others: wait until all of them are flowing again
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            answers = [_readyz(w) for w in workers]
            if all(status == 200 for status, _ in answers):
                break
            await asyncio.sleep(0.5)
        assert [status for status, _ in answers] == [200, 200, 200], answers
        held = sorted(body["kafka_partitions"] for _, body in answers)
        assert held[0] == 0, answers  # a spare with nothing assigned is ready
        assert held[-1] >= 2, answers  # prompts and responses partitions went to one worker
        assert all(body["kafka_joined"] and body["consuming"] for _, body in answers)
    finally:
        for worker in workers:
            worker.stop()
