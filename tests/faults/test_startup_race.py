"""Start-up right after topic creation: the broker may describe a topic it has just created as
unknown, with no partitions; `ensure_topics` must wait for them (a worker started with 0
partitions crashed in Faust's table set-up: "Topic cannot have zero partitions")."""

from __future__ import annotations

import asyncio

import pytest

from service.config import Settings
from service.kafka import ensure_topics
from tests.faults.services import OwnServices
from tests.service.harness import topic_env

pytestmark = [pytest.mark.faults, pytest.mark.integration]


@pytest.mark.timeout(120)
async def test_fresh_topics_are_described_with_their_partitions(
    own_services: OwnServices, unique: str, tmp_path: object
) -> None:
    async def fresh(i: int) -> int:
        env = {
            k.removeprefix("GUARDSTREAM_").lower(): v for k, v in topic_env(f"{unique}{i}").items()
        }
        settings = Settings(
            **env,
            kafka_bootstrap_servers=own_services.bootstrap,
            topic_partitions=3,
            engine="replay",
            replay_path=str(tmp_path),
        )
        return await ensure_topics(settings)

    # several at once, as workers of a fresh deployment would
    assert await asyncio.gather(*(fresh(i) for i in range(6))) == [3] * 6
