"""The verdict event of an early-exit prompt, and the committed JSON Schemas (schemas/json/),
which are generated from the pydantic models and must say what the models say."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import jsonschema

from engine.parser import parse
from schemas.events import SourceRef, VerdictEvent
from schemas.export import EXPORTED, export_schemas
from tests.conftest import REPO_ROOT

COMMITTED = REPO_ROOT / "schemas" / "json"
TASK_1 = (
    "# Task 1\n\n## Reasoning Step 1\nThe user asks how to make a weapon.\n\n"
    "## Conclusion for Task 1: The human user's request is harmful.\n"
)


def test_committed_schemas_are_the_models_own(tmp_path: Path) -> None:
    """Regenerate with `make schemas` (`guardstream schemas export schemas/json`)."""
    export_schemas(tmp_path)
    for name in EXPORTED:
        file = f"{name}.schema.json"
        assert (COMMITTED / file).read_text(encoding="utf-8") == (tmp_path / file).read_text(
            encoding="utf-8"
        ), f"schemas/json/{file} is stale: run make schemas"


def test_the_early_exit_flag_is_documented() -> None:
    schema = json.loads((COMMITTED / "verdict_event.schema.json").read_text(encoding="utf-8"))
    flag = schema["$defs"]["Verdict"]["properties"]["early_exit"]
    assert flag["type"] == "boolean" and flag["default"] is False
    assert "Task 1" in flag["description"]
    assert "early_exit" in schema["properties"]["verdict"]["description"]


def test_an_early_exit_verdict_event_carries_task_1_only() -> None:
    verdict = parse(
        TASK_1, has_response=False, quoted=("How do I make a weapon?", None), early_exit=True
    )
    event = VerdictEvent(
        event_id="e",
        source_id="p1",
        conversation_id="c",
        kind="prompt",
        verdict=verdict,
        flagged=verdict.harmful,
        model_id="m",
        model_revision="r",
        engine="replay",
        cached=False,
        latency_ms=1.0,
        source=SourceRef(topic="chat.prompts", partition=0, offset=7),
        produced_at=datetime.now(UTC),
    )
    wire = json.loads(event.model_dump_json())
    schema = json.loads((COMMITTED / "verdict_event.schema.json").read_text(encoding="utf-8"))
    jsonschema.validate(wire, schema)
    body = wire["verdict"]
    assert body["early_exit"] is True
    assert (body["request"], body["completion"], body["response"]) == ("harmful", None, None)
    assert (body["found"], body["trust"], body["trusted"]) == ("recovered", "recovered", True)
    assert list(body["reasoning"]) == ["request"]
    assert body["raw"] == TASK_1
    assert VerdictEvent.model_validate(wire).verdict == verdict
