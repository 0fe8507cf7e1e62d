"""Hostile messages through a real worker and broker: each gets a verdict or a dead letter, big
ones included (1 MB+ and 10 MB, on a topic that accepts them), and the worker stays up."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from engine.prompt import build_model_input
from tests.faults.harness import read_topic
from tests.security.hostile import ROWS, ROWS_MAX_NEW_TOKENS, replay_records
from tests.service.conftest import replay_folder, samples
from tests.service.harness import produce, running_worker

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


@pytest.mark.timeout(240)
@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
async def test_hostile_outputs_through_a_worker_are_flagged_or_marked(
    tmp_path: Path, base_env: dict[str, str], kafka_bootstrap: str, unique: str, policy: str
) -> None:
    """The five kinds of hostile or incomplete output (tests.security.hostile.ROWS), recorded
    for these very inputs, through a worker in the default configuration (prompts stored and
    paired, cache on): each verdict says its trust state; under fail_closed every one is
    flagged, under fail_open only the harmful ones; a trusted safe verdict stays unflagged."""
    safe_prompt = "What is the capital of France?"
    safe = "Answers: \nRequest: unharmful\nCompletion: None\nResponse: None\n"
    records = [
        *replay_records(),
        {"prompt": build_model_input(safe_prompt, None), "predict": safe},
    ]
    # a response's prompt is moderated on its own too (MODERATE=both): record those outputs
    for _, prompt, response, _, _ in ROWS.values():
        if response is not None and not any(
            r["prompt"] == build_model_input(prompt, None) for r in records
        ):
            records.append({"prompt": build_model_input(prompt, None), "predict": safe})
    replay = tmp_path / "hostile.jsonl"
    replay.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    env = {
        **base_env,
        "GUARDSTREAM_REPLAY_PATH": str(replay),
        "GUARDSTREAM_POLICY": policy,
        "GUARDSTREAM_MAX_NEW_TOKENS": str(ROWS_MAX_NEW_TOKENS),
        "GUARDSTREAM_MODEL_REVISION": f"rev-{unique}",  # a cache key space of this test's own
        "GUARDSTREAM_LOG_FORMAT": "text",
    }
    prompts, responses = [], []
    expected: dict[str, str] = {}  # source id -> trust state
    for i, (name, (_, prompt, response, trust, _)) in enumerate(ROWS.items()):
        conv = f"conv-{i}"
        prompts.append(
            (conv.encode(), json.dumps({"id": f"p{i}", "conversation_id": conv, "text": prompt}))
        )
        if response is None:
            expected[f"p{i}"] = trust
        else:
            reply = {"id": f"r{i}", "conversation_id": conv, "reply_to": f"p{i}", "text": response}
            responses.append((conv.encode(), json.dumps(reply)))
            expected[f"r{i}"] = trust
            assert name  # its prompt's own verdict is the recorded safe one, or a row's
    prompts.append(
        (
            b"conv-safe",
            json.dumps({"id": "safe", "conversation_id": "conv-safe", "text": safe_prompt}),
        )
    )
    with running_worker(env, tmp_path / "worker.log") as worker:
        await produce(
            kafka_bootstrap, env["GUARDSTREAM_TOPIC_PROMPTS"], [(k, v.encode()) for k, v in prompts]
        )
        await produce(
            kafka_bootstrap,
            env["GUARDSTREAM_TOPIC_RESPONSES"],
            [(k, v.encode()) for k, v in responses],
        )
        verdicts = await read_topic(
            kafka_bootstrap,
            env["GUARDSTREAM_TOPIC_VERDICTS"],
            until=len(prompts) + len(responses),
            timeout=90,
        )
        assert worker.ready(), worker.log_tail()
    by_id = {v["source_id"]: v for v in verdicts}
    for source_id, trust in expected.items():
        v = by_id[source_id]
        assert v["verdict"]["trust"] == trust, (source_id, v["verdict"])
        assert v["prompt_missing"] is False
        harmful = "harmful" in (v["verdict"]["request"], v["verdict"]["response"])
        assert v["flagged"] is (policy == "fail_closed" or harmful), (source_id, v)
    assert by_id["safe"]["verdict"]["trusted"] and not by_id["safe"]["flagged"]
