"""Wire formats of guardstream: pydantic models of every event and verdict.

This package imports nothing else of guardstream. JSON Schemas for downstream consumers are
generated from these models (`guardstream schemas export DIR`), never written by hand.
"""

from schemas.events import (
    SCHEMA_VERSION,
    DeadLetter,
    EventKind,
    PromptEvent,
    ResponseEvent,
    SourceRef,
    VerdictEvent,
)
from schemas.verdict import (
    CompletionLabel,
    HarmLabel,
    LabelSource,
    ModerationRequest,
    Task,
    TaskReasoning,
    Verdict,
)

__all__ = [
    "SCHEMA_VERSION",
    "CompletionLabel",
    "DeadLetter",
    "EventKind",
    "HarmLabel",
    "LabelSource",
    "ModerationRequest",
    "PromptEvent",
    "ResponseEvent",
    "SourceRef",
    "Task",
    "TaskReasoning",
    "Verdict",
    "VerdictEvent",
]
