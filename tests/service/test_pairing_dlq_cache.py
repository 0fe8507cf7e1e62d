"""The worker against the real local Kafka and Redis: pairing, dead letters, the cache."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest

from tests.service.conftest import replay_folder, samples
from tests.service.harness import consume, produce, running_worker, values

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _prompt(pid: str, conv: str, text: str) -> bytes:
    return json.dumps({"id": pid, "conversation_id": conv, "text": text}).encode()


def _response(rid: str, conv: str, reply_to: str, text: str, prompt: str | None = None) -> bytes:
    body = {"id": rid, "conversation_id": conv, "reply_to": reply_to, "text": text}
    if prompt is not None:
        body["prompt"] = prompt
    return json.dumps(body).encode()


async def test_pairing_by_reply_to(
    tmp_path: Path, shared_dir: Path, base_env: dict[str, str], kafka_bootstrap: str
) -> None:
    rows = [r for r in samples(shared_dir, "1B", "HarmBenchResponse") if r["response"]][:6]
    env = {
        **base_env,
        "GUARDSTREAM_REPLAY_PATH": str(
            replay_folder(tmp_path, shared_dir, "1B", ["HarmBenchResponse"])
        ),
        "GUARDSTREAM_MODERATE": "responses",
        "GUARDSTREAM_PAIRING_WAIT_MS": "4000",
        "GUARDSTREAM_CACHE_ENABLED": "false",
    }
    with running_worker(env, tmp_path / "worker.log") as worker:
        prompts, responses = env["GUARDSTREAM_TOPIC_PROMPTS"], env["GUARDSTREAM_TOPIC_RESPONSES"]
        # 0-2: prompt first; 3-5: the response arrives first, its prompt a second later.
        early = [
            (f"c{i}".encode(), _prompt(f"p{i}", f"c{i}", r["prompt"]))
            for i, r in enumerate(rows[:3])
        ]
        await produce(kafka_bootstrap, prompts, early)
        answers = [
            (f"c{i}".encode(), _response(f"r{i}", f"c{i}", f"p{i}", r["response"] or ""))
            for i, r in enumerate(rows)
        ]
        await produce(kafka_bootstrap, responses, answers)
        await asyncio.sleep(1.0)
        late = [
            (f"c{i}".encode(), _prompt(f"p{i}", f"c{i}", r["prompt"]))
            for i, r in enumerate(rows)
            if i >= 3
        ]
        await produce(kafka_bootstrap, prompts, late)
        # A response whose prompt never comes is judged without it after the wait, not dropped.
        await produce(kafka_bootstrap, responses, [(b"cx", _response("rx", "cx", "nope", "Sure."))])
        got = values(
            await consume(kafka_bootstrap, env["GUARDSTREAM_TOPIC_VERDICTS"], 7, timeout=60)
        )
        assert worker.ready(), worker.log_tail()
    by_id = {v["source_id"]: v for v in got}
    assert sorted(by_id) == sorted([f"r{i}" for i in range(6)] + ["rx"]), worker.log_tail()
    assert len(got) == 7  # moderate=responses: the prompts themselves get no verdict
    for i in range(6):
        v = by_id[f"r{i}"]
        assert v["kind"] == "response" and not v["prompt_missing"]
        assert v["verdict"]["engine_error"] is None
        assert v["verdict"]["response"] in ("harmful", "unharmful")
    lost = by_id["rx"]
    assert lost["prompt_missing"] is True
    assert lost["flagged"] is True  # no recorded output for it: fail_closed


async def test_poison_messages_go_to_dlq_in_order(
    tmp_path: Path, shared_dir: Path, base_env: dict[str, str], kafka_bootstrap: str
) -> None:
    rows = samples(shared_dir, "1B", "SimpleSafetyTests")[:20]
    env = {
        **base_env,
        "GUARDSTREAM_REPLAY_PATH": str(
            replay_folder(tmp_path, shared_dir, "1B", ["SimpleSafetyTests"])
        ),
        "GUARDSTREAM_MODERATE": "prompts",
        "GUARDSTREAM_MAX_TEXT_CHARS": "5000",
        "GUARDSTREAM_OVER_LIMIT": "reject",
        "GUARDSTREAM_CACHE_ENABLED": "false",
    }
    poisons = [
        b"\xff\xfe not utf-8",
        b"{not json",
        b'{"id": "x", "conversation_id": "same", "text": 5}',
        b'{"id": "y", "conversation_id": "same", "text": "   "}',
        b"[1, 2, 3]",
        json.dumps({"id": "z", "conversation_id": "same", "text": "a" * 6000}).encode(),
        b"",
    ]
    stream: list[tuple[bytes, bytes]] = []
    for i, row in enumerate(rows):
        stream.append((b"same", _prompt(f"p{i}", "same", row["prompt"])))
        if i < len(poisons):
            stream.append((b"same", poisons[i]))
    with running_worker(env, tmp_path / "worker.log") as worker:
        await produce(kafka_bootstrap, env["GUARDSTREAM_TOPIC_PROMPTS"], stream)
        verdicts = values(
            await consume(kafka_bootstrap, env["GUARDSTREAM_TOPIC_VERDICTS"], 20, timeout=60)
        )
        dead = values(
            await consume(kafka_bootstrap, env["GUARDSTREAM_TOPIC_DLQ"], len(poisons), timeout=30)
        )
        assert worker.ready(), worker.log_tail()
    # one key: one partition: verdicts and dead letters keep the input order
    assert [v["source_id"] for v in verdicts] == [f"p{i}" for i in range(20)]
    offsets = [v["source"]["offset"] for v in verdicts]
    assert offsets == sorted(offsets)
    assert [base64.b64decode(d["payload_b64"]) for d in dead] == poisons
    assert [d["reason"] for d in dead] == [
        "not_utf8",
        "not_json",
        "invalid",
        "empty_text",
        "invalid",
        "too_long",
        "not_json",
    ]
    assert all(d["source"]["topic"] == env["GUARDSTREAM_TOPIC_PROMPTS"] for d in dead)
    assert "text" in dead[2]["error"]


async def test_second_pass_is_served_from_redis(
    tmp_path: Path, shared_dir: Path, base_env: dict[str, str], kafka_bootstrap: str, unique: str
) -> None:
    rows = samples(shared_dir, "1B", "HarmBenchPrompt")[:40]
    env = {
        **base_env,
        "GUARDSTREAM_MODERATE": "prompts",
        "GUARDSTREAM_MODEL_REVISION": f"rev-{unique}",
    }
    first = {
        **env,
        "GUARDSTREAM_REPLAY_PATH": str(
            replay_folder(tmp_path, shared_dir, "1B", ["HarmBenchPrompt"])
        ),
    }
    # Second pass: a replay folder that cannot answer these inputs at all, so every good
    # verdict must come from the cache (the backend is never able to produce one).
    second = {
        **env,
        "GUARDSTREAM_REPLAY_PATH": str(
            replay_folder(tmp_path, shared_dir, "1B", ["SimpleSafetyTests"])
        ),
    }
    stream = [
        (f"c{i}".encode(), _prompt(f"p{i}", f"c{i}", r["prompt"])) for i, r in enumerate(rows)
    ]
    topic_v = env["GUARDSTREAM_TOPIC_VERDICTS"]
    with running_worker(first, tmp_path / "w1.log"):
        await produce(kafka_bootstrap, env["GUARDSTREAM_TOPIC_PROMPTS"], stream)
        one = values(await consume(kafka_bootstrap, topic_v, 40, timeout=60))
    assert len(one) == 40 and not any(v["cached"] for v in one)
    with running_worker(second, tmp_path / "w2.log") as worker:
        await produce(kafka_bootstrap, env["GUARDSTREAM_TOPIC_PROMPTS"], stream)
        both = values(await consume(kafka_bootstrap, topic_v, 80, timeout=60))
        assert worker.ready()
    two = both[40:]
    assert len(two) == 40, "each message of the second pass must get exactly one verdict"
    assert all(v["cached"] for v in two)
    assert all(v["verdict"]["engine_error"] is None for v in two)
    first_labels = {v["source_id"]: v["verdict"]["request"] for v in one}
    assert {v["source_id"]: v["verdict"]["request"] for v in two} == first_labels


async def test_shadow_mode_publishes_verdicts_and_nothing_to_flagged(
    tmp_path: Path, shared_dir: Path, base_env: dict[str, str], kafka_bootstrap: str
) -> None:
    rows = samples(shared_dir, "1B", "SimpleSafetyTests")[:12]  # harmful prompts: most flag
    env = {
        **base_env,
        "GUARDSTREAM_REPLAY_PATH": str(
            replay_folder(tmp_path, shared_dir, "1B", ["SimpleSafetyTests"])
        ),
        "GUARDSTREAM_CACHE_ENABLED": "false",
        "GUARDSTREAM_SHADOW": "true",
    }
    records = [
        (f"c{i}".encode(), _prompt(f"p{i}", f"c{i}", r["prompt"])) for i, r in enumerate(rows)
    ]
    with running_worker(env, tmp_path / "worker.log"):
        await produce(kafka_bootstrap, env["GUARDSTREAM_TOPIC_PROMPTS"], records)
        verdicts = await consume(kafka_bootstrap, env["GUARDSTREAM_TOPIC_VERDICTS"], len(rows))
        # A verdict's flagged copy is produced with it, before its input is acked: by now it
        # would be on the topic.
        flagged = await consume(kafka_bootstrap, env["GUARDSTREAM_TOPIC_FLAGGED"], 1, timeout=3)
    events = values(verdicts)
    assert sorted(e["source_id"] for e in events) == sorted(f"p{i}" for i in range(len(rows)))
    assert sum(e["flagged"] for e in events) >= len(rows) // 2  # flagged as without shadow
    assert all(("guardstream-shadow", b"1") in r.headers for r in verdicts)
    assert flagged == []
    log = (tmp_path / "worker.log").read_text()
    assert "shadow mode (GUARDSTREAM_SHADOW)" in log


async def test_tenants_with_the_same_message_ids_never_pair_across(
    tmp_path: Path, shared_dir: Path, base_env: dict[str, str], kafka_bootstrap: str
) -> None:
    """Two tenants send the same prompt id in the same conversation; each response pairs with
    its own tenant's prompt. The replay engine answers only a recorded (prompt, response) pair,
    so a response paired with the other tenant's prompt would get an engine_error verdict."""
    rows = [r for r in samples(shared_dir, "1B", "HarmBenchResponse") if r["response"]][:2]
    assert rows[0]["prompt"] != rows[1]["prompt"]
    env = {
        **base_env,
        "GUARDSTREAM_REPLAY_PATH": str(
            replay_folder(tmp_path, shared_dir, "1B", ["HarmBenchResponse"])
        ),
    }
    tenants = ["acme", "globex"]

    def event(body: dict[str, str], tenant: str) -> tuple[bytes, bytes]:
        return b"conv-shared", json.dumps({**body, "tenant": tenant}).encode()

    with running_worker(env, tmp_path / "worker.log") as worker:
        await produce(
            kafka_bootstrap,
            env["GUARDSTREAM_TOPIC_PROMPTS"],
            [
                event({"id": "m1", "conversation_id": "conv-shared", "text": r["prompt"]}, t)
                for t, r in zip(tenants, rows, strict=True)
            ],
        )
        await produce(
            kafka_bootstrap,
            env["GUARDSTREAM_TOPIC_RESPONSES"],
            [
                event(
                    {
                        "id": f"r-{t}",
                        "conversation_id": "conv-shared",
                        "reply_to": "m1",
                        "text": r["response"] or "",
                    },
                    t,
                )
                for t, r in zip(tenants, rows, strict=True)
            ],
        )
        got = values(
            await consume(kafka_bootstrap, env["GUARDSTREAM_TOPIC_VERDICTS"], 4, timeout=60)
        )
        assert worker.ready(), worker.log_tail()
    responses = {v["source_id"]: v for v in got if v["kind"] == "response"}
    assert sorted(responses) == ["r-acme", "r-globex"], worker.log_tail()
    for tenant in tenants:
        v = responses[f"r-{tenant}"]
        assert v["tenant"] == tenant
        assert not v["prompt_missing"]
        assert v["verdict"]["engine_error"] is None, v["verdict"]["engine_error"]
