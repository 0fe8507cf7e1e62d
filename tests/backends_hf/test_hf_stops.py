"""The `hf` backend's per-input stop strings and its cancellation, on the tiny random Llama.

Random weights write garbage, so a stop string certain to occur is taken from an output
generated first without one. Greedy decoding makes the stopped output that output's prefix.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from engine.backends.base import Generation
from engine.backends.hf import _WINDOW_MARGIN, HfBackend
from engine.prompt import EARLY_EXIT_STOP
from tests.backends_hf.conftest import PROMPTS
from tests.backends_hf.tiny_llama import RiggedTinyLlama

#: New tokens of the unstopped outputs the stops are taken from: long enough that a stop from
#: the middle of one ends it well before its end.
LONG = 40


async def _started(tiny: RiggedTinyLlama, **kwargs: Any) -> HfBackend:
    backend = HfBackend(tiny.model.path, device="cpu", **kwargs)
    await backend.start()
    return backend


@pytest.fixture
async def pinned(tiny: RiggedTinyLlama) -> AsyncIterator[HfBackend]:
    """EOS ignored: every unstopped output is exactly as long as asked for."""
    b = await _started(tiny, ignore_eos=True, max_batch_size=16)
    yield b
    await b.close()


@pytest.fixture
async def full(pinned: HfBackend) -> list[Generation]:
    return await pinned.generate(PROMPTS, LONG)


def _stop_inside(text: str) -> str:
    """Three printable ASCII characters from the middle third of `text`: a stop string that
    occurs in it, and (first occurrence included) not at its very end."""
    for a in range(len(text) // 3, 2 * len(text) // 3):
        piece = text[a : a + 3]
        if len(piece) == 3 and all(c.isascii() and c.isprintable() for c in piece):
            return piece
    raise AssertionError(f"no printable stretch in the middle of {text!r}")


def _stops_every_other(full: list[Generation]) -> list[str | None]:
    return [_stop_inside(g.text) if r % 2 == 0 else None for r, g in enumerate(full)]


@contextmanager
def counting_forwards(backend: HfBackend, pause_s: float = 0.0) -> Iterator[list[int]]:
    """Counts the model's forward passes (one per generated token of a batch: the prefill gives
    the first); `pause_s` makes each one last at least that long."""
    count = [0]

    def hook(module: Any, args: Any) -> None:
        count[0] += 1
        if pause_s:
            time.sleep(pause_s)

    handle = backend._model.register_forward_pre_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


async def _wait_model_free(backend: HfBackend) -> None:
    """Until the worker thread holding the model (a cancelled call's, say) has let it go."""
    await asyncio.to_thread(backend._model_lock.acquire)
    backend._model_lock.release()


# ---- stop strings -----------------------------------------------------------------------------


@pytest.mark.parametrize("max_batch_size", [3, 16])
async def test_each_row_is_cut_before_its_own_stop(
    tiny: RiggedTinyLlama, full: list[Generation], max_batch_size: int
) -> None:
    """Rows of one batch with different stops (some none): a row whose output holds its stop
    ends before it, as the prefix of its unstopped output, with fewer tokens; a row without a
    stop is untouched."""
    stops = _stops_every_other(full)
    b = await _started(tiny, ignore_eos=True, max_batch_size=max_batch_size)
    try:
        gens = await b.generate(PROMPTS, LONG, stops)
        alone = [(await b.generate([p], LONG, [s]))[0] for p, s in zip(PROMPTS, stops, strict=True)]
    finally:
        await b.close()
    assert gens == alone
    for gen, whole, stop in zip(gens, full, stops, strict=True):
        if stop is None:
            assert gen == whole
            continue
        assert stop in whole.text
        assert gen.text == whole.text[: whole.text.index(stop)]
        assert gen.finish_reason == "stop" and gen.error is None
        assert gen.tokens is not None and whole.tokens is not None
        assert 0 < gen.tokens < whole.tokens


async def test_token_count_ends_where_the_stop_string_completes(
    pinned: HfBackend, full: list[Generation]
) -> None:
    """`tokens` is the number of new tokens up to the one that completed the stop string:
    the output capped one token earlier does not hold the stop yet, capped there it does."""
    stops = _stops_every_other(full)
    gens = await pinned.generate(PROMPTS, LONG, stops)
    for prompt, gen, stop in zip(PROMPTS, gens, stops, strict=True):
        if stop is None:
            continue
        assert gen.tokens is not None
        [at] = await pinned.generate([prompt], gen.tokens)
        assert stop in at.text
        if gen.tokens > 1:
            [before] = await pinned.generate([prompt], gen.tokens - 1)
            assert stop not in before.text


async def test_with_eos_the_first_of_stop_and_eos_ends_a_row(
    tiny: RiggedTinyLlama, pinned: HfBackend, full: list[Generation]
) -> None:
    """With EOS honoured: a row whose stop comes before its EOS is cut at the stop; a row whose
    EOS comes first, or whose stop never occurs, ends on its EOS as without a stop."""
    b = await _started(tiny, max_batch_size=16)
    try:
        plain = await b.generate(PROMPTS, LONG)
        stops = [_stop_inside(g.text) for g in full]
        gens = await b.generate(PROMPTS, LONG, stops)
        never = await b.generate(PROMPTS, LONG, [EARLY_EXIT_STOP] * len(PROMPTS))
    finally:
        await b.close()
    for gen, eos_ended, whole, stop in zip(gens, plain, full, stops, strict=True):
        if stop in eos_ended.text:
            assert gen.text == whole.text[: whole.text.index(stop)]
            assert gen.finish_reason == "stop" and gen.tokens is not None
            assert eos_ended.tokens is not None and gen.tokens < eos_ended.tokens
        else:
            assert gen == eos_ended
    assert any(stop in g.text for g, stop in zip(plain, stops, strict=True))
    assert any(stop not in g.text for g, stop in zip(plain, stops, strict=True))
    assert not any(EARLY_EXIT_STOP in g.text for g in full)
    assert never == plain and any(g.finish_reason == "stop" for g in plain)
    assert await pinned.generate(PROMPTS, LONG, [EARLY_EXIT_STOP] * len(PROMPTS)) == full


async def test_a_batch_whose_rows_all_stopped_ends_there(
    pinned: HfBackend, full: list[Generation]
) -> None:
    """Stopped rows consume no more steps of output, and when every row has stopped the batch
    ends: its forward passes are its longest stopped row's tokens, not max_new_tokens. One row
    without a stop keeps the whole (static) batch running to the end."""
    stops: list[str | None] = [_stop_inside(g.text) for g in full]
    with counting_forwards(pinned) as forwards:
        gens = await pinned.generate(PROMPTS, LONG, stops)
    longest = max(g.tokens or 0 for g in gens)
    assert forwards[0] == longest < LONG
    stops[-1] = None
    with counting_forwards(pinned) as forwards:
        gens = await pinned.generate(PROMPTS, LONG, stops)
    assert forwards[0] == LONG
    assert gens[-1] == full[-1] and all(g.finish_reason == "stop" for g in gens[:-1])


async def test_only_a_tail_window_is_decoded_while_generating(
    pinned: HfBackend, full: list[Generation], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop check decodes, for each watched row, only its newest few tokens (the stop
    string's bytes and a margin), in one batched call per step: never the whole output."""
    stops = _stops_every_other(full)
    widest = max(len(s.encode()) for s in stops if s is not None) + _WINDOW_MARGIN
    tokenizer = pinned._tokenizer
    decode_batch = tokenizer.batch_decode
    seen: list[list[int]] = []

    def spy(sequences: list[list[int]], **kwargs: Any) -> Any:
        seen.extend(sequences)
        return decode_batch(sequences, **kwargs)

    monkeypatch.setattr(tokenizer, "batch_decode", spy)
    gens = await pinned.generate(PROMPTS, LONG, stops)
    assert seen, "the stop check never ran"
    assert max(len(s) for s in seen) <= widest < LONG
    assert len(seen) <= sum(g.tokens or 0 for g, s in zip(gens, stops, strict=True) if s)


async def test_malformed_stops_are_refused(pinned: HfBackend) -> None:
    with pytest.raises(ValueError, match="2 entries for 3 inputs"):
        await pinned.generate(PROMPTS[:3], 4, ["a", None])
    with pytest.raises(ValueError, match="must not be empty"):
        await pinned.generate(PROMPTS[:2], 4, ["", None])


# ---- cancellation -----------------------------------------------------------------------------

#: Short inputs, so that CANCEL_STEPS new tokens fit the tiny model's 256 positions.
SHORT = [PROMPTS[0], PROMPTS[2], PROMPTS[4]]
CANCEL_STEPS = 200


async def test_a_cancelled_call_stops_its_generation(
    tiny: RiggedTinyLlama, full: list[Generation]
) -> None:
    """Cancelled after a few decode steps of its first batch (of three), the call's worker
    ends at its next step and starts no other batch: a few forward passes, not 3 x 200."""
    b = await _started(tiny, ignore_eos=True, max_batch_size=1)
    try:
        with counting_forwards(b, pause_s=0.002) as forwards:
            task = asyncio.create_task(b.generate(SHORT, CANCEL_STEPS))
            while forwards[0] < 5:
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            at_cancel = forwards[0]
            await _wait_model_free(b)
        # At most the step that was starting as the flag was set.
        assert forwards[0] <= at_cancel + 1 < 3 * CANCEL_STEPS, (at_cancel, forwards[0])
        # The backend serves the next call as if nothing had happened.
        again = await b.generate(SHORT, LONG)
        assert again == [full[PROMPTS.index(p)] for p in SHORT]
    finally:
        await b.close()


async def test_a_call_past_its_deadline_stops_its_generation(tiny: RiggedTinyLlama) -> None:
    """What `engine.retry`'s deadline does (asyncio.timeout around generate): the timed-out
    call's generation ends within a step, and the next call does not wait for the rest of it."""
    b = await _started(tiny, ignore_eos=True, max_batch_size=16)
    try:
        with counting_forwards(b, pause_s=0.005) as forwards:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await b.generate(SHORT, CANCEL_STEPS)
            began = time.monotonic()
            [gen] = await b.generate([SHORT[0]], 2)
            waited = time.monotonic() - began
        assert gen.tokens == 2
        assert forwards[0] < CANCEL_STEPS // 2, f"{forwards[0]} forward passes"
        assert waited < CANCEL_STEPS * 0.005 / 2, f"the next call waited {waited:.2f} s"
    finally:
        await b.close()
