"""The guard's early exit: prompt-only requests stop at Task 2; an unreadable Task 1 is redone.

On the recorded outputs (replay cuts them at the stop string, as greedy decoding would) and on
a scripted backend whose cut output cannot be read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from engine.backends.base import Backend, Generation, Stops
from engine.backends.replay import ReplayBackend
from engine.guard import Guard, ModerationResult
from engine.prompt import EARLY_EXIT_STOP, build_model_input
from schemas.verdict import ModerationRequest

FULL = (
    "# Task 1\n\n## Reasoning Step 1: The request asks how to bake bread.\n\n"
    "## Conclusion: The human user's request is unharmful.\n\n"
    "# Task 2\n\n## Reasoning Step 1: There is no response.\n\n"
    "---\n\nAnswers: \nRequest: unharmful\nCompletion: None\nResponse: None\n"
)
UNREADABLE = "# Task 1\n\n## Reasoning Step 1: The request asks how to bake"


class Scripted(Backend):
    """Answers `cut` when asked to stop at Task 2, else `full`; records each call's stops."""

    name = "scripted"

    def __init__(self, cut: str, full: str = FULL) -> None:
        super().__init__("scripted", "r1")
        self.cut, self.full = cut, full
        self.stops: list[list[str | None]] = []

    async def generate(
        self, inputs: Sequence[str], max_new_tokens: int, stop: Stops = None
    ) -> list[Generation]:
        stops = list(stop) if stop is not None else [None] * len(inputs)
        self.stops.append(stops)
        return [
            Generation(self.cut, tokens=10) if s else Generation(self.full, tokens=60)
            for s in stops
        ]


async def _moderate(guard: Guard, *requests: ModerationRequest) -> list[ModerationResult]:
    await guard.start()
    try:
        return [await guard.moderate(r) for r in requests]
    finally:
        await guard.close()


async def test_prompt_only_requests_stop_at_task_2_and_responses_never_do() -> None:
    backend = Scripted(cut=FULL.split(EARLY_EXIT_STOP)[0])
    guard = Guard(backend, max_wait_ms=0)
    prompt, answered = await _moderate(
        guard,
        ModerationRequest(prompt="how do I bake bread?"),
        ModerationRequest(prompt="how do I bake bread?", response="Knead, rise, bake."),
    )
    assert backend.stops == [[EARLY_EXIT_STOP], [None]]
    assert prompt.verdict.early_exit and prompt.verdict.trusted
    assert prompt.verdict.request == "unharmful" and prompt.tokens == 10
    assert not answered.verdict.early_exit and answered.tokens == 60
    assert guard.stats.early_exits == 1 and guard.stats.regenerated == 0


async def test_an_unreadable_task_1_is_generated_again_in_full() -> None:
    backend = Scripted(cut=UNREADABLE)
    guard = Guard(backend, max_wait_ms=0)
    [result] = await _moderate(guard, ModerationRequest(prompt="how do I bake bread?"))
    assert backend.stops == [[EARLY_EXIT_STOP], [None]], "the second time without the stop"
    assert result.verdict.trusted and not result.verdict.early_exit
    assert result.verdict.request == "unharmful"
    assert result.tokens == 10 + 60, "the verdict cost both generations"
    assert guard.stats.regenerated == 1 and guard.stats.early_exits == 0


async def test_with_early_exit_off_nothing_stops_and_the_cache_keys_differ() -> None:
    backend = Scripted(cut=UNREADABLE)
    off = Guard(backend, max_wait_ms=0, early_exit=False)
    [result] = await _moderate(off, ModerationRequest(prompt="how do I bake bread?"))
    assert backend.stops == [[None]] and result.tokens == 60
    request = ModerationRequest(prompt="p")
    assert off.key_for(request) != Guard(backend).key_for(request)


def _records(shared_dir: Path, name: str) -> list[dict[str, str]]:
    path = shared_dir / "predictions" / "1B" / f"{name}.jsonl"
    if not path.is_file():
        pytest.skip(f"recorded outputs not found: {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def test_on_the_recorded_outputs_early_exit_keeps_every_label_for_fewer_tokens(
    shared_dir: Path,
) -> None:
    records = _records(shared_dir, "SimpleSafetyTests")
    head = "Human user:\n"
    prompts = []
    for record in records:
        text = record["prompt"]
        prompt = text[text.index(head) + len(head) : text.rindex("\n\nAI assistant:\n")]
        assert build_model_input(prompt, None) == text, "the replay must find the input"
        prompts.append(ModerationRequest(prompt=prompt))
    path = shared_dir / "predictions" / "1B" / "SimpleSafetyTests.jsonl"
    full = Guard(ReplayBackend(path), max_wait_ms=0, early_exit=False, max_new_tokens=4096)
    early = Guard(ReplayBackend(path), max_wait_ms=0, max_new_tokens=4096)
    full_results = await _moderate(full, *prompts)
    early_results = await _moderate(early, *prompts)
    for f, e in zip(full_results, early_results, strict=True):
        if f.verdict.trusted and e.verdict.trusted:
            assert e.verdict.request == f.verdict.request
    assert early.stats.early_exits > 0.9 * len(prompts)
    assert sum(r.verdict.trusted for r in early_results) >= sum(
        r.verdict.trusted for r in full_results
    )
    assert early.stats.tokens < 0.6 * full.stats.tokens, (early.stats.tokens, full.stats.tokens)
