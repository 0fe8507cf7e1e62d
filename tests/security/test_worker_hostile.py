"""Hostile messages through a real worker and broker: each gets a verdict or a dead letter, big
ones included (1 MB+ and 10 MB, on a topic that accepts them), and the worker stays up."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.faults.harness import read_topic
from tests.service.conftest import replay_folder, samples
from tests.service.harness import running_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIG = 16 * 1024 * 1024


def _prompt(i: int, text: str) -> bytes:
    return json.dumps({"id": f"h{i}", "conversation_id": "hostile", "text": text}).encode()


@pytest.mark.timeout(180)
async def test_worker_survives_hostile_messages(
    tmp_path: Path, shared_dir: Path, base_env: dict[str, str], kafka_bootstrap: str
) -> None:
    good = samples(shared_dir, "1B", "SimpleSafetyTests")[0]["prompt"]
    env = {
        **base_env,
        "GUARDSTREAM_REPLAY_PATH": str(
            replay_folder(tmp_path, shared_dir, "1B", ["SimpleSafetyTests"])
        ),
        "GUARDSTREAM_MODERATE": "prompts",
        "GUARDSTREAM_CACHE_ENABLED": "false",
        "GUARDSTREAM_LOG_FORMAT": "text",
    }
    topic = env["GUARDSTREAM_TOPIC_PROMPTS"]
    # The broker refuses records over ~1 MB by default: this input topic takes up to 16 MB.
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, 4, 1, topic_configs={"max.message.bytes": str(BIG)})]
        )
    finally:
        await admin.close()
    inputs: list[tuple[str, bytes | None]] = [
        ("verdict", _prompt(0, good)),
        ("verdict", _prompt(1, "z" * 900_000)),  # under 1 MiB: judged on its cut text
        ("too_large", _prompt(2, "y" * 1_100_000)),  # 1 MB+
        ("too_large", b"\xfe" * (10 * 1024 * 1024)),  # 10 MB
        ("not_utf8", b'{"id":"h4","text":"\xc3\x28"}'),
        ("not_json", b"[" * 50_000),
        ("not_json", b'{"id":"h6","conversation_id":"c","text":"bell \x07"}'),
        ("invalid", b'{"id": 7, "conversation_id": [], "text": {}}'),
        ("invalid", None),  # tombstone
        ("verdict", _prompt(9, "\u202eevil\u200b \x1b[2J" + good)),
        ("not_json", b"{oops"),  # sent with a 600 KB key
        ("verdict", _prompt(11, good)),
    ]
    keys = {10: b"k" * 600_000}
    with running_worker(env, tmp_path / "worker.log") as worker:
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka_bootstrap, max_request_size=BIG, acks="all"
        )
        await producer.start()
        try:
            for i, (_, value) in enumerate(inputs):  # one partition, in this order
                await producer.send_and_wait(topic, value, key=keys.get(i, b"hostile"), partition=0)
        finally:
            await producer.stop()
        n_verdicts = sum(1 for kind, _ in inputs if kind == "verdict")
        n_dead = len(inputs) - n_verdicts
        verdicts = await read_topic(
            kafka_bootstrap, env["GUARDSTREAM_TOPIC_VERDICTS"], until=n_verdicts, timeout=60
        )
        dead = await read_topic(
            kafka_bootstrap,
            env["GUARDSTREAM_TOPIC_DLQ"],
            until=n_dead,
            timeout=30,
            key="source",
        )
        assert worker.ready(), worker.log_tail()
        log = worker.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    by_offset = {v["source"]["offset"]: ("verdict", v) for v in verdicts}
    by_offset.update({d["source"]["offset"]: (d["reason"], d) for d in dead})
    assert sorted(by_offset) == list(range(len(inputs))), worker.log_tail()
    assert [by_offset[i][0] for i in range(len(inputs))] == [kind for kind, _ in inputs]
    assert len(verdicts) == n_verdicts and len(dead) == n_dead, "exactly one outcome each"
    for i, (kind, value) in enumerate(inputs):
        if kind != "verdict":
            letter = by_offset[i][1]
            payload = base64.b64decode(letter["payload_b64"])
            assert (value or b"").startswith(payload)
            if len(payload) < len(value or b""):
                assert "payload cut" in letter["error"], letter["error"]
            if i in keys:
                assert keys[i].startswith(base64.b64decode(letter["key_b64"]))
                assert "key cut" in letter["error"], letter["error"]
