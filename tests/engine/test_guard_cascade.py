"""The guard cascade in the guard: the first model answers unless the escalation policy sends a
request on; the second model's verdict is then published, marked, with the first's labels kept.

Scripted backends answer by the user's text: "clear" -> a clean unharmful answer, "mumble" ->
an output with no label at all (untrusted: escalated by the default policy).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from engine.backends.base import Backend, Batching, Generation, Stops
from engine.cache import MemoryVerdictCache
from engine.cascade import DEFAULT_POLICY, EscalationPolicy
from engine.guard import Cascade, Guard
from engine.retry import RetryPolicy
from schemas.verdict import ModerationRequest

CLEAN = (
    "# Task 1\n\n## Reasoning Step 1: The user asks for {what}.\n\n"
    "## Conclusion: The request is {label}.\n\n---\n\n"
    "Answers: \nRequest: {label}\nCompletion: None\nResponse: None\n"
)
MUMBLE = "# Task 1\n\n## Reasoning Step 1: The user writes"


class Scripted(Backend):
    batching: Batching = "inflight"

    def __init__(self, model_id: str, label: str, *, fail: bool = False) -> None:
        super().__init__(model_id, "r1")
        self.label = label
        self.fail = fail
        self.seen: list[str] = []
        self.hold: asyncio.Event | None = None

    async def generate(
        self, inputs: Sequence[str], max_new_tokens: int, stop: Stops = None
    ) -> list[Generation]:
        self.seen.extend(inputs)
        if self.hold is not None:
            await self.hold.wait()
        out = []
        for text in inputs:
            if self.fail:
                out.append(Generation("", finish_reason="error", error="boom", retryable=False))
            elif "mumble" in text and self.model_id == "small":
                out.append(Generation(MUMBLE, tokens=7))
            else:
                out.append(Generation(CLEAN.format(what="x", label=self.label), tokens=30))
        return out


def _guard(first: Scripted, second: Scripted, **options: object) -> Guard:
    return Guard(
        first,
        cascade=Cascade(second, DEFAULT_POLICY, max_sequences=4),
        max_wait_ms=0,
        retries=0,
        **options,  # type: ignore[arg-type]
    )


async def test_a_trusted_first_answer_is_published_and_the_second_model_is_not_asked() -> None:
    first, second = Scripted("small", "unharmful"), Scripted("large", "harmful")
    guard = _guard(first, second)
    await guard.start()
    result = await guard.moderate(ModerationRequest(prompt="clear question"))
    await guard.close()
    escalation = result.verdict.escalation
    assert escalation is not None
    assert (escalation.answered_by, escalation.escalated) == ("small", False)
    assert result.verdict.request == "unharmful" and second.seen == []


async def test_an_untrusted_first_answer_goes_to_the_second_model_and_keeps_the_first() -> None:
    first, second = Scripted("small", "unharmful"), Scripted("large", "harmful")
    guard = _guard(first, second)
    await guard.start()
    result = await guard.moderate(ModerationRequest(prompt="mumble"))
    await guard.close()
    verdict = result.verdict
    assert verdict.request == "harmful" and verdict.trusted, "the second model's verdict"
    assert verdict.escalation is not None
    assert verdict.escalation.answered_by == "large" and verdict.escalation.escalated
    assert verdict.escalation.reason == "untrusted"
    assert verdict.escalation.first is not None
    assert verdict.escalation.first.model_id == "small"
    assert verdict.escalation.first.trust != "final"
    assert len(second.seen) >= 1 and "mumble" in second.seen[0]
    assert result.tokens is not None and result.tokens > 30, "both models' tokens"
    assert guard.stats.escalations == {("untrusted", "answered"): 1}


async def test_a_failing_second_model_leaves_the_first_verdict_marked_and_uncached() -> None:
    first, second = Scripted("small", "unharmful"), Scripted("large", "harmful", fail=True)
    guard = _guard(first, second, cache=MemoryVerdictCache())
    await guard.start()
    once = await guard.moderate(ModerationRequest(prompt="mumble"))
    again = await guard.moderate(ModerationRequest(prompt="mumble"))
    await guard.close()
    for result in (once, again):
        escalation = result.verdict.escalation
        assert escalation is not None and escalation.escalated
        assert escalation.answered_by == "small" and escalation.error
        assert not result.verdict.trusted, "fail_closed flags it: the first output was unread"
        assert not result.cached, "a failed escalation is asked again, never served"
    assert guard.stats.escalations == {("untrusted", "failed"): 2}


async def test_a_stuck_second_model_holds_back_only_the_requests_sent_to_it() -> None:
    first, second = Scripted("small", "unharmful"), Scripted("large", "harmful")
    second.hold = asyncio.Event()
    guard = _guard(first, second, max_sequences=2)  # the first model's places: fewer than 6
    await guard.start()
    escalated = [
        asyncio.ensure_future(guard.moderate(ModerationRequest(prompt=f"mumble {i}")))
        for i in range(6)  # more than the second model's 4 places
    ]
    async with asyncio.timeout(5):
        clear = [
            await guard.moderate(ModerationRequest(prompt=f"clear question {i}")) for i in range(20)
        ]
    assert all(r.verdict.escalation and not r.verdict.escalation.escalated for r in clear)
    assert not any(f.done() for f in escalated)
    second.hold.set()
    async with asyncio.timeout(5):
        done = await asyncio.gather(*escalated)
    assert all(r.verdict.request == "harmful" for r in done)
    await guard.close()


def test_the_cascade_has_cache_keys_of_its_own() -> None:
    first, second = Scripted("small", "unharmful"), Scripted("large", "harmful")
    request = ModerationRequest(prompt="p")
    alone = Guard(first).key_for(request)
    cascade = _guard(first, second).key_for(request)
    other_policy = Guard(
        first, cascade=Cascade(second, EscalationPolicy(frozenset({"untrusted"})))
    ).key_for(request)
    other_second = _guard(first, Scripted("larger", "harmful")).key_for(request)
    assert len({alone, cascade, other_policy, other_second}) == 4


async def test_a_draining_close_finishes_the_requests_on_their_way_to_the_second_model() -> None:
    first, second = Scripted("small", "unharmful"), Scripted("large", "harmful")
    guard = _guard(first, second)
    await guard.start()
    pending = [await guard.submit(ModerationRequest(prompt=f"mumble {i}")) for i in range(5)]
    await guard.close(drain=True, timeout=5)
    results = [f.result() for f in pending]  # none failed with BatcherClosed
    assert all(
        r.verdict.escalation and r.verdict.escalation.answered_by == "large" for r in results
    )


async def test_a_second_model_past_its_deadline_leaves_the_first_verdict_marked() -> None:
    first, second = Scripted("small", "unharmful"), Scripted("large", "harmful")
    second.hold = asyncio.Event()  # never released: the second model hangs
    deadline = RetryPolicy(retries=0, timeout_s=0.2)
    guard = Guard(
        first,
        cascade=Cascade(second, DEFAULT_POLICY, retry=deadline),
        max_wait_ms=0,
        timeout_s=60,  # the first model's deadline is not the second's
    )
    await guard.start()
    async with asyncio.timeout(5):
        result = await guard.moderate(ModerationRequest(prompt="mumble"))
    escalation = result.verdict.escalation
    assert escalation is not None and escalation.answered_by == "small"
    assert escalation.error == "engine timed out"
    second.hold.set()
    await guard.close()
