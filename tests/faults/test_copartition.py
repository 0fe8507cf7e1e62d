"""Mixed partitioners, as the README promises: prompts from a Java-partitioned client (aiokafka:
murmur2) and responses from librdkafka's default partitioner (confluent-kafka: CRC32). Responses
outside their conversation's murmur2 partition are counted and warned about; with one worker
every response still pairs (its table holds every partition); with two, a misrouted response
pairs only when the same worker holds its prompt's partition, and is moderated alone
(`prompt_missing`) once the prompts stream passed it otherwise. Nothing is lost."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Producer

from service.copartition import java_partition, librdkafka_partition
from tests.faults.harness import read_topic, wait_for
from tests.faults.paired_stream import build_stream, produce_stream
from tests.faults.services import OwnServices
from tests.service.conftest import replay_folder
from tests.service.harness import Worker, create_topics

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 4


def _librdkafka_produce(bootstrap: str, topic: str, events: list[tuple[bytes, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})  # default partitioner
    for key, value in events:
        producer.produce(topic, value=value, key=key)
    assert producer.flush(30) == 0


def _misrouted(worker: Worker, topic: str) -> int:
    status, body = worker.get("/metrics")
    assert status == 200
    total = 0
    for line in body.decode().splitlines():
        if line.startswith("guardstream_misrouted_total{") and f'topic="{topic}"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


@pytest.mark.timeout(400)
async def test_mixed_partitioners_are_detected_and_pair_where_one_worker_sees_both(
    fault_env: dict[str, str],
    tmp_path: Path,
    shared_dir: Path,
    own_services: OwnServices,
    report: Callable[..., None],
) -> None:
    bootstrap = own_services.bootstrap
    folder = replay_folder(tmp_path, shared_dir, "1B", ["HarmBenchResponse"])
    env = {**fault_env, "GUARDSTREAM_REPLAY_PATH": str(folder)}
    prompts_topic, responses_topic = (
        env["GUARDSTREAM_TOPIC_PROMPTS"],
        env["GUARDSTREAM_TOPIC_RESPONSES"],
    )
    verdicts = env["GUARDSTREAM_TOPIC_VERDICTS"]
    await create_topics(bootstrap, [prompts_topic, responses_topic], PARTITIONS)
    stream = await build_stream(folder, ["HarmBenchResponse"])
    prompts = [e for e in stream.events if e[0] == "prompts"]
    answers = [
        (k, v)
        for kind, k, v in stream.events
        if kind == "responses" and "prompt" not in json.loads(v)
    ]
    half = len(answers) // 2
    phases = {"one worker": answers[:half], "two workers": answers[half:]}

    def misplaced(key: bytes) -> bool:
        return java_partition(key, PARTITIONS) != librdkafka_partition(key, PARTITIONS)

    one = Worker(env, tmp_path / "one.log")
    two = Worker(env, tmp_path / "two.log")
    figures: dict[str, dict[str, int]] = {}
    try:
        await asyncio.to_thread(one.start)
        await produce_stream(bootstrap, {"prompts": prompts_topic}, prompts)
        seen = 0
        for name, events in phases.items():
            if name == "two workers":
                await asyncio.to_thread(two.start)

                async def settled() -> bool:  # both joined and flowing: the group has settled
                    return one.ready() and two.ready()

                assert await wait_for(settled, 90, interval=0.2), one.log_tail()
            await asyncio.to_thread(_librdkafka_produce, bootstrap, responses_topic, events)
            seen += len(events)
            got = await read_topic(bootstrap, verdicts, until=len(prompts) + seen, timeout=180)
            by_id = {v["source_id"]: v for v in got}
            ids = [json.loads(v)["id"] for _, v in events]
            assert all(i in by_id for i in ids), f"{name}: responses without a verdict"
            wrong = [json.loads(v)["id"] for k, v in events if misplaced(k)]
            right = [json.loads(v)["id"] for k, v in events if not misplaced(k)]
            figures[name] = {
                "responses": len(events),
                "misrouted": len(wrong),
                "misrouted_paired": sum(not by_id[i]["prompt_missing"] for i in wrong),
                "co_partitioned_unpaired": sum(by_id[i]["prompt_missing"] for i in right),
            }
        counted = _misrouted(one, responses_topic) + _misrouted(two, responses_topic)
        logs = one.log_path.read_text() + two.log_path.read_text()
    finally:
        for worker in (one, two):
            if worker.proc is not None:
                worker.stop(timeout=30)
    report(**{re.sub(r"\W", "_", k): v for k, v in figures.items()}, misrouted_metric=counted)
    total_wrong = sum(f["misrouted"] for f in figures.values())
    assert total_wrong > 0
    assert counted == total_wrong, "every misrouted response is counted once"
    assert f"on {responses_topic} not in the partition" in logs, "the warning names the topic"
    assert "murmur2_random" in logs
    for f in figures.values():
        assert f["co_partitioned_unpaired"] == 0, figures
    # One worker holds every partition: a misrouted response still finds its prompt.
    assert figures["one worker"]["misrouted_paired"] == figures["one worker"]["misrouted"], figures
