"""The worker group in the default configuration (pairing and cache on, MODERATE=both): a worker
that stored prompts is restarted, workers join and one is killed mid-stream, a backlog is caught
up by a growing group. Every response by `reply_to` to a prompt sent before it is paired."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import Progress, committed_lag, duplicates, read_topic
from tests.faults.paired_stream import (
    ALL_SETS,
    build_stream,
    produce_stream,
    stream_f1,
)
from tests.faults.services import OwnServices
from tests.service.conftest import replay_folder
from tests.service.harness import Worker, create_topics

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def group_env(fault_env: dict[str, str], tmp_path: Path, shared_dir: Path) -> dict[str, str]:
    folder = replay_folder(tmp_path, shared_dir, "1B", ALL_SETS)
    return {**fault_env, "GUARDSTREAM_REPLAY_PATH": str(folder)}


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[[dict[str, str], str], Worker]]:
    made: list[Worker] = []

    def make(env: dict[str, str], name: str) -> Worker:
        worker = Worker(env, tmp_path / f"{name}.log")
        made.append(worker)
        return worker

    yield make
    for worker in made:
        if worker.proc is not None:
            worker.stop(timeout=30)


def _topics(env: dict[str, str]) -> dict[str, str]:
    return {
        "prompts": env["GUARDSTREAM_TOPIC_PROMPTS"],
        "responses": env["GUARDSTREAM_TOPIC_RESPONSES"],
    }


def _figures(stream: Any, got: list[dict[str, Any]]) -> dict[str, Any]:
    ids = [v["source_id"] for v in got]
    responses = {v["source_id"]: v for v in got if v["kind"] == "response"}
    unpaired = sorted(s for s, v in responses.items() if v["prompt_missing"])
    lost = sorted(stream.ids - set(ids))
    return {
        "inputs": len(stream.ids),
        "lost": len(lost),
        "lost_examples": lost[:40],
        "duplicates": duplicates(ids),
        "responses_by_reply_to": len(stream.by_reply_to),
        "unpaired": len(unpaired),
        "unpaired_examples": unpaired[:5],
    }


async def _where(bootstrap: str, env: dict[str, str], ids: set[str]) -> list[str]:
    """topic/partition@offset of the input events with these ids (to diagnose a loss)."""
    from aiokafka import AIOKafkaConsumer

    out = []
    for topic in (env["GUARDSTREAM_TOPIC_PROMPTS"], env["GUARDSTREAM_TOPIC_RESPONSES"]):
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            while True:
                batch = await consumer.getmany(timeout_ms=1000)
                if not batch:
                    break
                for records in batch.values():
                    for r in records:
                        if json.loads(r.value)["id"] in ids:
                            out.append(f"{r.topic}/{r.partition}@{r.offset}")
        finally:
            await consumer.stop()
    return sorted(out)


def _recovery_errors(*logs: Worker) -> int:
    return sum(w.log_path.read_text(errors="replace").count("Error in recovery") for w in logs)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_a_restarted_worker_with_stored_prompts_is_ready_and_pairs_them(
    sig: signal.Signals,
    group_env: dict[str, str],
    workers: Callable[[dict[str, str], str], Worker],
    own_services: OwnServices,
    replay_dir: Path,
    report: Callable[..., None],
) -> None:
    bootstrap = own_services.bootstrap
    stream = await build_stream(Path(group_env["GUARDSTREAM_REPLAY_PATH"]), ["HarmBenchResponse"])
    prompts = [e for e in stream.events if e[0] == "prompts"][:240]
    sent_ids = {json.loads(v)["id"] for _, _, v in prompts}
    answers = [
        e
        for e in stream.events
        if e[0] == "responses"
        and "prompt" not in json.loads(e[2])
        and json.loads(e[2])["reply_to"] in sent_ids
    ]
    first = workers(group_env, "first")
    await asyncio.to_thread(first.start)
    await produce_stream(bootstrap, _topics(group_env), prompts)
    got = await read_topic(
        bootstrap, group_env["GUARDSTREAM_TOPIC_VERDICTS"], until=240, timeout=120
    )
    assert {v["source_id"] for v in got} >= sent_ids, first.log_tail()

    async def committed() -> bool:
        lag = await committed_lag(
            bootstrap, group_env["GUARDSTREAM_APP_ID"], group_env["GUARDSTREAM_TOPIC_PROMPTS"]
        )
        return lag == 0

    from tests.faults.harness import wait_for

    assert await wait_for(committed, 30), "the prompts' offsets were never committed"
    first.stop(sig, timeout=40)

    second = workers(group_env, "second")
    t0 = time.monotonic()
    await asyncio.to_thread(second.start, 120)
    ready_s = time.monotonic() - t0
    await produce_stream(bootstrap, _topics(group_env), answers)
    want = sent_ids | {json.loads(v)["id"] for _, _, v in answers}
    got = await read_topic(
        bootstrap, group_env["GUARDSTREAM_TOPIC_VERDICTS"], until=len(want), timeout=120
    )
    by_id = {v["source_id"]: v for v in got}
    responses = [by_id[json.loads(v)["id"]] for _, _, v in answers if json.loads(v)["id"] in by_id]
    unpaired = [v["source_id"] for v in responses if v["prompt_missing"]]
    report(
        signal=sig.name,
        stored_prompts=len(prompts),
        responses=len(answers),
        answered=len(responses),
        unpaired=len(unpaired),
        time_to_ready_s=round(ready_s, 1),
        recovery_errors=_recovery_errors(first, second),
    )
    assert len(responses) == len(answers), second.log_tail()
    assert not unpaired, unpaired[:5]
    assert _recovery_errors(first, second) == 0
    assert second.ready(), second.log_tail()


@pytest.mark.timeout(420)
async def test_scale_out_then_failover_mid_stream_pairs_every_response(
    group_env: dict[str, str],
    workers: Callable[[dict[str, str], str], Worker],
    own_services: OwnServices,
    report: Callable[..., None],
) -> None:
    bootstrap = own_services.bootstrap
    verdicts = group_env["GUARDSTREAM_TOPIC_VERDICTS"]
    stream = await build_stream(Path(group_env["GUARDSTREAM_REPLAY_PATH"]))
    n = len(stream.ids)
    one, two, three = workers(group_env, "w1"), workers(group_env, "w2"), workers(group_env, "w3")
    await asyncio.to_thread(one.start)
    async with Progress(bootstrap, verdicts) as progress:
        # A stream that lasts: the joins and the kill land while it flows.
        producing = asyncio.create_task(
            produce_stream(bootstrap, _topics(group_env), stream.events, chunk=50, pause_s=0.2)
        )
        await progress.reach(n // 10, timeout=120)
        # Two more join while it is being moderated.
        await asyncio.gather(asyncio.to_thread(two.start), asyncio.to_thread(three.start))
        at_join = progress.count
        await progress.reach(at_join + n // 10, timeout=120)
        two.stop(signal.SIGKILL)
        at_kill = progress.count
        produced_at_kill = not producing.done()
        await producing
    got = await read_topic(bootstrap, verdicts, until=len(stream.ids), timeout=240, settle=3.0)
    figures = _figures(stream, got)
    if figures["lost"]:
        figures["lost_at"] = await _where(bootstrap, group_env, set(figures["lost_examples"]))
    report(
        **figures,
        verdicts_at_join=at_join,
        verdicts_at_kill=at_kill,
        still_producing_at_kill=produced_at_kill,
        recovery_errors=_recovery_errors(one, two, three),
    )
    assert figures["lost"] == 0, (figures, one.log_tail(), three.log_tail())
    assert figures["unpaired"] == 0, figures
    assert stream_f1(stream, got) == pytest.approx(stream.expected_f1, abs=1e-9)
    assert one.ready() and three.ready(), (one.log_tail(), three.log_tail())


@pytest.mark.timeout(420)
async def test_a_backlog_caught_up_by_one_then_three_workers_pairs_every_response(
    group_env: dict[str, str],
    workers: Callable[[dict[str, str], str], Worker],
    own_services: OwnServices,
    report: Callable[..., None],
) -> None:
    bootstrap = own_services.bootstrap
    verdicts = group_env["GUARDSTREAM_TOPIC_VERDICTS"]
    partitions = int(group_env["GUARDSTREAM_TOPIC_PARTITIONS"])
    await create_topics(
        bootstrap,
        [group_env[f"GUARDSTREAM_TOPIC_{t}"] for t in ("PROMPTS", "RESPONSES")],
        partitions,
    )
    stream = await build_stream(Path(group_env["GUARDSTREAM_REPLAY_PATH"]))
    await produce_stream(bootstrap, _topics(group_env), stream.events)  # no worker runs
    one, two, three = workers(group_env, "w1"), workers(group_env, "w2"), workers(group_env, "w3")
    t0 = time.monotonic()
    async with Progress(bootstrap, verdicts) as progress:
        await asyncio.to_thread(one.start)
        await progress.reach(len(stream.ids) // 10, timeout=120)
        await asyncio.gather(asyncio.to_thread(two.start), asyncio.to_thread(three.start))
    got = await read_topic(bootstrap, verdicts, until=len(stream.ids), timeout=240, settle=3.0)
    figures = _figures(stream, got)
    report(**figures, caught_up_s=round(time.monotonic() - t0, 1))
    assert figures["lost"] == 0, figures
    assert figures["unpaired"] == 0, figures
    assert stream_f1(stream, got) == pytest.approx(stream.expected_f1, abs=1e-9)


def _pairing(worker: Worker) -> dict[str, float]:
    status, body = worker.get("/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line.startswith("guardstream_pairing_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = out.get(outcome, 0) + float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.timeout(300)
async def test_a_prompt_that_never_comes_is_given_up_by_event_time_in_a_group(
    group_env: dict[str, str],
    workers: Callable[[dict[str, str], str], Worker],
    own_services: OwnServices,
    report: Callable[..., None],
) -> None:
    """Two workers; responses by reply_to to prompts that never come: each is moderated alone
    once its prompts partition passed its time (outcome `passed`), none waits for the
    wall-clock bound (`timeout`), wherever its partition is."""
    bootstrap = own_services.bootstrap
    one, two = workers(group_env, "w1"), workers(group_env, "w2")
    await asyncio.to_thread(one.start)
    await asyncio.to_thread(two.start)

    async def settled() -> bool:
        return one.ready() and two.ready()

    from tests.faults.harness import wait_for

    assert await wait_for(settled, 90, interval=0.2)
    n = 24
    events = [
        (
            "responses",
            f"conv-{i}".encode(),
            json.dumps(
                {
                    "id": f"r{i}",
                    "conversation_id": f"conv-{i}",
                    "reply_to": f"gone-{i}",
                    "text": "Sure.",
                }
            ).encode(),
        )
        for i in range(n)
    ]
    t0 = time.monotonic()
    await produce_stream(bootstrap, _topics(group_env), events)
    got = await read_topic(bootstrap, group_env["GUARDSTREAM_TOPIC_VERDICTS"], until=n, timeout=200)
    took = time.monotonic() - t0
    outcomes = [_pairing(one), _pairing(two)]
    report(responses=n, verdicts=len(got), all_verdicts_s=round(took, 1), outcomes=outcomes)
    assert sorted(v["source_id"] for v in got) == sorted(f"r{i}" for i in range(n))
    assert all(v["prompt_missing"] for v in got)
    assert sum(o.get("passed", 0) for o in outcomes) == n, outcomes
    assert not any(o.get("timeout") for o in outcomes), outcomes
