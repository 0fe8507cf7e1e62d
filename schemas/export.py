"""JSON Schema export of the event models, for downstream consumers."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from schemas.events import DeadLetter, PromptEvent, ResponseEvent, VerdictEvent

EXPORTED: dict[str, type[BaseModel]] = {
    "prompt_event": PromptEvent,
    "response_event": ResponseEvent,
    "verdict_event": VerdictEvent,
    "dead_letter": DeadLetter,
}


def export_schemas(directory: Path) -> list[Path]:
    """Write `<name>.schema.json` for each event model into `directory`; return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in EXPORTED.items():
        path = directory / f"{name}.schema.json"
        schema = model.model_json_schema(mode="serialization")
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(path)
    return written
