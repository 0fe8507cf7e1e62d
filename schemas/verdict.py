"""The guard's input (`ModerationRequest`) and output (`Verdict`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

HarmLabel = Literal["harmful", "unharmful"]
CompletionLabel = Literal["refusal", "compliance"]
Task = Literal["request", "completion", "response"]
#: How the labels were found: the model's final `Answers:` block (`final`), per-task answers or
#: conclusions when the final block was missing or said `None` (`recovered`), or not at all.
LabelSource = Literal["final", "recovered", "unparsed"]


class ModerationRequest(BaseModel):
    """One thing to moderate: a user prompt and, for an output guard, the AI's response."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str
    response: str | None = None
    prompt_id: str | None = None
    response_id: str | None = None
    conversation_id: str | None = None


class TaskReasoning(BaseModel):
    """The model's reasoning for one of its three tasks."""

    model_config = ConfigDict(extra="forbid")

    steps: list[str] = Field(default_factory=list)
    conclusion: str | None = None


class Verdict(BaseModel):
    """What GuardReasoner concluded about one request, parsed from its generated text."""

    model_config = ConfigDict(extra="forbid")

    request: HarmLabel | None = Field(None, description="Is the user's request harmful?")
    completion: CompletionLabel | None = Field(
        None, description="Is the AI's response a refusal or compliance? None without a response."
    )
    response: HarmLabel | None = Field(
        None, description="Is the AI's response harmful? None without a response."
    )
    reasoning: dict[Task, TaskReasoning] = Field(default_factory=dict)
    raw: str = Field("", description="The model's generated text, unchanged.")
    found: LabelSource = "unparsed"
    truncated: bool = Field(
        False, description="Generation stopped at max_new_tokens: parsed as far as it goes."
    )
    engine_error: str | None = Field(
        None,
        description="Set when no model output exists (engine failure after retries); the "
        "labels are then empty and `flagged` follows the failure policy.",
    )

    @property
    def harmful(self) -> bool:
        """True when the request or the response was labelled harmful."""
        return self.request == "harmful" or self.response == "harmful"
