"""The guard's input (`ModerationRequest`) and output (`Verdict`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

HarmLabel = Literal["harmful", "unharmful"]
CompletionLabel = Literal["refusal", "compliance"]
Task = Literal["request", "completion", "response"]
#: How the labels were found: the model's final `Answers:` block (`final`); per-task answers or
#: conclusions where the final block was missing or said `None`, or Task 1 of an early-exit
#: output (`recovered`); a label the request needs is missing (`incomplete`); the model's
#: statements disagree (`conflicting`, resolved by `engine.parser.CONFLICT_RULE`); no label at
#: all (`unparsed`).
LabelSource = Literal["final", "recovered", "incomplete", "conflicting", "unparsed"]
#: How far a verdict can be trusted: its `found`, or `truncated` (cut at `max_new_tokens`), or
#: `engine_error` (no output). Only `final` and `recovered` are trusted.
TrustState = Literal[
    "final", "recovered", "incomplete", "conflicting", "unparsed", "truncated", "engine_error"
]
TRUSTED_STATES: frozenset[str] = frozenset({"final", "recovered"})


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


class FirstOpinion(BaseModel):
    """The first model's labels, kept in a verdict the cascade's second model gave."""

    model_config = ConfigDict(extra="forbid")

    model_id: str
    request: HarmLabel | None = None
    completion: CompletionLabel | None = None
    response: HarmLabel | None = None
    trust: TrustState


class Escalation(BaseModel):
    """How a guard cascade (a first, small model; a second, large one asked only where the
    first's output cannot be trusted) reached this verdict."""

    model_config = ConfigDict(extra="forbid")

    answered_by: str = Field(description="The id of the model whose verdict this is.")
    escalated: bool = Field(description="The escalation policy sent the request on.")
    reason: str | None = Field(
        None, description="The policy's signal that sent it on (untrusted, contradiction, ...)."
    )
    error: str | None = Field(
        None,
        description="The second model failed on it (after retries): the first model's verdict "
        "stands, and the failure policy applies to it as to any verdict.",
    )
    first: FirstOpinion | None = Field(
        None, description="The first model's labels, when the second model answered."
    )


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
    quoted: int = Field(
        0,
        description="Answer blocks, conclusions and reasoning steps of the output that repeat "
        "the user's own text: read as quotes, not as the model's answer.",
    )
    early_exit: bool = Field(
        False,
        description="The labels came from a Task 1-only output: generation of a prompt-only "
        "request stopped before the model's Task 2 (early exit). `request` and "
        "`reasoning.request` are Task 1's, `completion` and `response` are null, `raw` is the "
        "cut text. Trusted (`found` recovered) only when Task 1 states the request label "
        "cleanly; the guard generates any other in full, and publishes that verdict instead.",
    )
    escalation: Escalation | None = Field(
        None, description="Set by a guard cascade (GUARDSTREAM_ESCALATE_ENGINE); else null."
    )

    @model_validator(mode="before")
    @classmethod
    def _computed_fields_in(cls, data: Any) -> Any:
        # A serialized verdict carries `trust` and `trusted` (computed): read it back as is.
        if isinstance(data, dict) and ("trust" in data or "trusted" in data):
            data = {k: v for k, v in data.items() if k not in ("trust", "trusted")}
        return data

    @computed_field  # type: ignore[prop-decorator]
    @property
    def trust(self) -> TrustState:
        """`engine_error`, else `truncated`, else how the labels were found."""
        if self.engine_error is not None:
            return "engine_error"
        if self.truncated:
            return "truncated"
        return self.found

    @computed_field  # type: ignore[prop-decorator]
    @property
    def trusted(self) -> bool:
        """Every label the request needs was read, from the model's own consistent answer, in
        a complete output. `fail_closed` flags every verdict that is not."""
        return self.trust in TRUSTED_STATES

    @property
    def harmful(self) -> bool:
        """True when the request or the response was labelled harmful."""
        return self.request == "harmful" or self.response == "harmful"
