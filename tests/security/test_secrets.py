"""Secrets stay out of logs, metrics and exported spans: a worker that authenticates to Kafka with
SASL/PLAIN (a broker of the test's own with a SASL listener) and to a Redis started with
--requirepass, logging at DEBUG with spans printed to stdout; and the failures: a wrong Kafka
password, SASL against a PLAINTEXT broker, a wrong Redis password, an invalid setting."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tests.conftest import REPO_ROOT
from tests.security.services import PasswordRedis, SaslBroker, kafka_libs
from tests.service.conftest import replay_folder, samples
from tests.service.harness import free_port, running_worker, topic_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KAFKA_PASSWORD = "kafka-S3cret-pw-9f2e"
REDIS_PASSWORD = "redis-S3cret-pw-4c7a"
WRONG_PASSWORD = "wr0ng-S3cret-pw-11b5"
SECRETS = (KAFKA_PASSWORD, REDIS_PASSWORD, WRONG_PASSWORD)


def leaks(text: str) -> list[str]:
    """The secrets found in `text`, plain, URL-quoted or inside a base64 SASL token."""
    found = []
    for secret in SECRETS:
        forms = {
            secret,
            urllib.parse.quote(secret),
            base64.b64encode(f"\0alice\0{secret}".encode()).decode(),
            base64.b64encode(secret.encode()).decode().rstrip("="),
        }
        if any(form in text for form in forms):
            found.append(secret)
    return found


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SaslBroker]:
    libs = kafka_libs()
    if libs is None:
        pytest.fail("Kafka jars not found: run deploy/local/up once (it fetches them)")
    broker = SaslBroker(
        tmp_path_factory.mktemp("sasl-broker"), {"admin": "admin-pw", "alice": KAFKA_PASSWORD}
    )
    try:
        broker.start(libs)
        asyncio.run(broker.wait_ready())
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasswordRedis]:
    redis = PasswordRedis(tmp_path_factory.mktemp("redis-pw"), REDIS_PASSWORD)
    redis.start()
    try:
        yield redis
    finally:
        redis.stop()


@pytest.fixture
def secret_env(
    tmp_path: Path, shared_dir: Path, sasl_broker: SaslBroker, unique: str
) -> dict[str, str]:
    return {
        **topic_env(unique),
        "GUARDSTREAM_KAFKA_BOOTSTRAP_SERVERS": sasl_broker.bootstrap,
        "GUARDSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "GUARDSTREAM_KAFKA_SASL_MECHANISM": "PLAIN",
        "GUARDSTREAM_KAFKA_SASL_USERNAME": "alice",
        "GUARDSTREAM_KAFKA_SASL_PASSWORD": KAFKA_PASSWORD,
        "GUARDSTREAM_ENGINE": "replay",
        "GUARDSTREAM_REPLAY_PATH": str(
            replay_folder(tmp_path, shared_dir, "1B", ["SimpleSafetyTests"])
        ),
        "GUARDSTREAM_MODERATE": "prompts",
        "GUARDSTREAM_TOPIC_PARTITIONS": "1",
        "GUARDSTREAM_LOG_LEVEL": "DEBUG",
        "GUARDSTREAM_TRACES_EXPORTER": "console",
        "GUARDSTREAM_GRACE_PERIOD_S": "10",
    }


async def _round_trip(
    broker: SaslBroker, env: dict[str, str], texts: list[str], prefix: str
) -> list[dict[str, object]]:
    kwargs = broker.client_kwargs("alice", KAFKA_PASSWORD)
    producer = AIOKafkaProducer(**kwargs)
    await producer.start()
    try:
        for i, text in enumerate(texts):
            body = {"id": f"{prefix}{i}", "conversation_id": "c", "text": text}
            await producer.send_and_wait(
                env["GUARDSTREAM_TOPIC_PROMPTS"], json.dumps(body).encode()
            )
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        env["GUARDSTREAM_TOPIC_VERDICTS"], auto_offset_reset="earliest", **kwargs
    )
    await consumer.start()
    got: list[dict[str, object]] = []
    try:
        async with asyncio.timeout(60):
            while sum(1 for v in got if str(v["source_id"]).startswith(prefix)) < len(texts):
                batch = await consumer.getmany(timeout_ms=300)
                got += [json.loads(r.value) for rs in batch.values() for r in rs]
    finally:
        await consumer.stop()
    return [v for v in got if str(v["source_id"]).startswith(prefix)]


@pytest.mark.timeout(180)
async def test_no_secret_in_logs_metrics_or_spans_of_a_working_worker(
    tmp_path: Path,
    shared_dir: Path,
    sasl_broker: SaslBroker,
    password_redis: PasswordRedis,
    secret_env: dict[str, str],
) -> None:
    env = {**secret_env, "GUARDSTREAM_REDIS_URL": password_redis.url()}
    texts = [r["prompt"] for r in samples(shared_dir, "1B", "SimpleSafetyTests")[:8]]
    log_path = tmp_path / "worker.log"
    with running_worker(env, log_path) as worker:
        first = await _round_trip(sasl_broker, env, texts, "a")
        second = await _round_trip(sasl_broker, env, texts, "b")  # from the Redis cache
        metrics = worker.get("/metrics")[1].decode(errors="replace")
        ready = worker.get("/readyz")[1].decode(errors="replace")
    log = log_path.read_text(errors="replace")
    assert len(first) == len(second) == len(texts)
    assert all(v["cached"] for v in second), "the password-protected Redis is used"
    assert '"span_id"' in log, "spans were exported to stdout"
    assert "Authenticated as alice via PLAIN" in log, "the worker did authenticate with SASL"
    assert leaks(log) == [], "a secret is in the worker's log or exported spans"
    assert leaks(metrics) == [] and leaks(ready) == []


def _serve(env: dict[str, str], timeout: float = 90) -> tuple[int, str]:
    """Run `guardstream serve` to its exit (or `timeout`); its exit status and output."""
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve"],
        cwd=REPO_ROOT,
        env={
            **os.environ,
            "GUARDSTREAM_WEB_HOST": "127.0.0.1",
            "GUARDSTREAM_WEB_PORT": str(free_port()),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.timeout(240)
async def test_no_secret_in_the_output_of_failures(
    tmp_path: Path,
    shared_dir: Path,
    kafka_bootstrap: str,
    sasl_broker: SaslBroker,
    password_redis: PasswordRedis,
    secret_env: dict[str, str],
) -> None:
    outputs: dict[str, str] = {}
    # 1. a wrong Kafka password: authentication fails at start-up
    rc, out = _serve(
        {
            **secret_env,
            "GUARDSTREAM_KAFKA_SASL_PASSWORD": WRONG_PASSWORD,
            "GUARDSTREAM_REDIS_URL": password_redis.url(),
        }
    )
    assert rc == 2 and "cannot reach Kafka" in out, out[-2000:]
    outputs["wrong kafka password"] = out
    # 2. SASL against the shared PLAINTEXT broker
    rc, out = _serve(
        {
            **secret_env,
            "GUARDSTREAM_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "GUARDSTREAM_REDIS_URL": password_redis.url(),
        }
    )
    assert rc == 2, out[-2000:]
    outputs["sasl against plaintext"] = out
    # 3. an invalid setting next to the secrets: the error names the setting, not the secrets
    rc, out = _serve(
        {
            **secret_env,
            "GUARDSTREAM_REDIS_URL": password_redis.url(),
            "GUARDSTREAM_BATCH_MAX_SIZE": "0",
            "GUARDSTREAM_OPENAI_API_KEY": KAFKA_PASSWORD,
        }
    )
    assert rc == 2 and "GUARDSTREAM_BATCH_MAX_SIZE" in out, out[-2000:]
    outputs["invalid setting"] = out
    # 4. a wrong Redis password: the worker runs on without the cache and says why
    env = {**secret_env, "GUARDSTREAM_REDIS_URL": password_redis.url(WRONG_PASSWORD)}
    texts = [r["prompt"] for r in samples(shared_dir, "1B", "SimpleSafetyTests")[:6]]
    log_path = tmp_path / "wrong-redis.log"
    got = []
    with running_worker(env, log_path):
        for k in range(3):  # separate batches: enough failed calls to open the cache's breaker
            got += await _round_trip(sasl_broker, env, texts[2 * k : 2 * k + 2], f"w{k}-")
    assert len(got) == len(texts) and not any(v["cached"] for v in got)
    log = log_path.read_text(errors="replace")
    assert "unavailable after" in log and "AuthenticationError" in log, log[-3000:]
    assert "redis://:***@" in log
    outputs["wrong redis password"] = log
    for case, text in outputs.items():
        assert leaks(text) == [], f"{case}: a secret is in the output"
