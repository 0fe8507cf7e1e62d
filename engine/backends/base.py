"""The one protocol every model backend speaks.

A backend turns complete model inputs (prompt strings, GuardReasoner's format, built by
`engine.prompt`) into generated text. It knows tokens and devices; it knows nothing of
requests, futures, caching or Kafka (the guard and the batcher do). Each backend lives in its
own module and imports its heavy library lazily, in `start()`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

FinishReason = Literal["stop", "length", "error"]
#: How a backend schedules what it is given: `"inflight"` engines (TensorRT-LLM, a vLLM or
#: trtllm-serve server, the bench's simulated engine) schedule every sequence on its own, so the
#: guard hands them each request as soon as a place is free; `"static"` ones (`hf`, `replay`)
#: run a call's inputs as one batch that ends with its longest output, so the guard batches.
Batching = Literal["inflight", "static"]
#: One stop string per input, or None for none (and `stop=None`: none for any input). Output
#: ends before the first occurrence of an input's stop string, which is left out of the text,
#: and its finish reason is "stop".
Stops = Sequence[str | None] | None


def per_input_stops(stop: Stops, n: int) -> list[str | None]:
    """`stop` as one entry per input (all None for `stop=None`); ValueError if it is malformed
    (another length than the inputs', or an empty string)."""
    if stop is None:
        return [None] * n
    stops = list(stop)
    if len(stops) != n:
        raise ValueError(f"stop has {len(stops)} entries for {n} inputs")
    if any(s == "" for s in stops):
        raise ValueError("a stop string must not be empty (use None for no stop)")
    return stops


class BackendError(Exception):
    """The backend could not produce output for a whole call (`engine.retry` retries it, then
    the guard applies the failure policy). `retry_after`: a wait the server asked for."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Generation:
    """The generated text for one input. `finish_reason="length"` means cut at max_new_tokens;
    `"error"` means this one input failed (`error` says why) while the rest of the batch ran;
    backends try once and say whether retrying may help, `engine.retry` does the retrying."""

    text: str
    tokens: int | None = None
    finish_reason: FinishReason = "stop"
    error: str | None = None
    #: For an error: whether another attempt may mend it (`engine.retry` retries only these).
    retryable: bool = True
    #: For an error: the server asked for this long a wait before another attempt.
    retry_after: float | None = None


class Backend(abc.ABC):
    """Base class of the backends: `replay`, `hf`, `trtllm`, `openai_http`."""

    #: Short engine name, as in GUARDSTREAM_ENGINE.
    name: str = "base"
    #: How it schedules its inputs (see `Batching`): the guard admits requests by it.
    batching: ClassVar[Batching] = "static"

    def __init__(self, model_id: str, revision: str) -> None:
        self.model_id = model_id
        self.revision = revision

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load the model (may take long). Called once before the first `generate`."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model and any connections."""

    @abc.abstractmethod
    async def generate(
        self, inputs: Sequence[str], max_new_tokens: int, stop: Stops = None
    ) -> list[Generation]:
        """Generate greedily for every input; return one Generation per input, in order.

        `stop[i]`, when given, ends input i's output before that string (see `Stops`). A
        cancelled call must stop its inputs' generation in the engine, not only stop waiting."""
