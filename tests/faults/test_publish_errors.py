"""A produce error that retrying cannot mend (here: the verdict topic refuses records as large
as a verdict) stops the partition's lane, says so, makes the worker unready, and commits nothing
it could not publish; the worker stays up."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.faults.harness import committed_lag, prompt_events, replay_samples, wait_for
from tests.faults.services import OwnServices
from tests.service.harness import Worker, produce

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(180)
async def test_a_verdict_topic_that_refuses_records_stalls_visibly_and_commits_nothing(
    fault_env: dict[str, str],
    replay_dir: Path,
    tmp_path: Path,
    own_services: OwnServices,
    report: Callable[..., None],
) -> None:
    bootstrap = own_services.bootstrap
    env = fault_env
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        # A verdict (with the model's reasoning) is several kB: this topic refuses every one.
        await admin.create_topics(
            [
                NewTopic(
                    env["GUARDSTREAM_TOPIC_VERDICTS"],
                    4,
                    1,
                    topic_configs={"max.message.bytes": "512"},
                )
            ]
        )
    finally:
        await admin.close()
    worker = Worker(env, tmp_path / "worker.log")
    await asyncio.to_thread(worker.start)
    try:
        n = 40
        await produce(
            bootstrap,
            env["GUARDSTREAM_TOPIC_PROMPTS"],
            prompt_events(replay_samples(replay_dir), n),
        )

        async def unready() -> bool:
            status, body = worker.get("/readyz")
            return status == 503 and bool(json.loads(body)["lanes_failing"])

        assert await wait_for(unready, 60, interval=0.2), worker.log_tail()
        _status, body = worker.get("/readyz")
        readiness = json.loads(body)
        lag = await committed_lag(
            bootstrap, env["GUARDSTREAM_APP_ID"], env["GUARDSTREAM_TOPIC_PROMPTS"]
        )
        alive = worker.get("/healthz")[0]
        log = worker.log_path.read_text()
    finally:
        worker.stop(timeout=30)
    report(messages=n, uncommitted=lag, lanes_failing=len(readiness["lanes_failing"]))
    assert readiness["lanes_ok"] is False
    assert all("MessageSizeTooLarge" in why for why in readiness["lanes_failing"].values())
    assert "retrying cannot mend" in log and env["GUARDSTREAM_TOPIC_VERDICTS"] in log
    assert lag == n, "nothing that could not be published is committed"
    assert alive == 200, "the worker stays up (liveness), only unready"
