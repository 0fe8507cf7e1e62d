"""Fixtures for the service tests: worker environments over the replay backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.service.harness import topic_env


def samples(shared_dir: Path, size: str, name: str) -> list[dict[str, str]]:
    """The recorded model inputs of one benchmark, as `prompt`/`response`/`label` dicts."""
    from engine.prompt import split_model_input

    out = []
    with (shared_dir / "predictions" / size / f"{name}.jsonl").open() as fh:
        for line in fh:
            row = json.loads(line)
            prompt, response = split_model_input(row["prompt"])
            out.append({"prompt": prompt, "response": response, "label": row["label"]})
    return out


@pytest.fixture
def base_env(kafka_bootstrap: str, redis_url: str, unique: str) -> dict[str, str]:
    return {
        **topic_env(unique),
        "GUARDSTREAM_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "GUARDSTREAM_REDIS_URL": redis_url,
        "GUARDSTREAM_ENGINE": "replay",
        "GUARDSTREAM_TOPIC_PARTITIONS": "4",
        "GUARDSTREAM_BATCH_MAX_WAIT_MS": "20",
        "GUARDSTREAM_LOG_LEVEL": "INFO",
        "GUARDSTREAM_GRACE_PERIOD_S": "20",
    }


def replay_folder(tmp_path: Path, shared_dir: Path, size: str, names: list[str]) -> Path:
    """A replay folder holding only the named prediction files (links to the shared ones)."""
    folder = tmp_path / f"replay-{size}-{len(names)}"
    folder.mkdir(exist_ok=True)
    for name in names:
        link = folder / f"{name}.jsonl"
        if not link.exists():
            link.symlink_to(shared_dir / "predictions" / size / f"{name}.jsonl")
    return folder
