"""The `hf` backend on a tiny random Llama, on CPU: batching, stopping, counting, failures."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.backends.base import BackendError, Generation
from engine.backends.hf import HfBackend, checkpoint_revision
from tests.backends_hf.conftest import PROMPTS, STEPS
from tests.backends_hf.tiny_llama import RiggedTinyLlama, build_tiny_llama


async def _started(path: Path, **kwargs: object) -> HfBackend:
    backend = HfBackend(path, device="cpu", **kwargs)  # type: ignore[arg-type]
    await backend.start()
    return backend


@pytest.fixture
async def backend(tiny: RiggedTinyLlama) -> AsyncIterator[HfBackend]:
    b = await _started(tiny.model.path, max_batch_size=3)
    yield b
    await b.close()


@pytest.fixture
async def one_by_one(backend: HfBackend) -> list[Generation]:
    return [(await backend.generate([p], STEPS))[0] for p in PROMPTS]


def test_premises(tiny: RiggedTinyLlama, backend: HfBackend) -> None:
    """What the other tests rely on: lengths differ a lot, and the rigged model stops on some
    prompts and runs to the cap on others."""
    lengths = [len(backend._tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert max(lengths) >= 5 * min(lengths)
    assert any(e is None for e in tiny.expected_tokens)
    assert any(e is not None and 1 < e < STEPS for e in tiny.expected_tokens)
    assert backend.device == "cpu" and backend.dtype == "float32"
    assert backend.eos_token_ids == [tiny.model.eos_token_id]


@pytest.mark.parametrize("max_batch_size", [3, 16])
async def test_batched_equals_one_by_one(
    tiny: RiggedTinyLlama, one_by_one: list[Generation], max_batch_size: int
) -> None:
    b = await _started(tiny.model.path, max_batch_size=max_batch_size)
    try:
        batched = await b.generate(PROMPTS, STEPS)
    finally:
        await b.close()
    assert batched == one_by_one


async def test_counts_and_finish_reasons(
    tiny: RiggedTinyLlama, one_by_one: list[Generation]
) -> None:
    """Token counts include the EOS and nothing after it; no EOS within the cap is "length"."""
    for gen, expected in zip(one_by_one, tiny.expected_tokens, strict=True):
        if expected is None:
            assert (gen.finish_reason, gen.tokens) == ("length", STEPS)
        else:
            assert (gen.finish_reason, gen.tokens) == ("stop", expected)
        assert gen.error is None and gen.text


async def test_cap_below_every_stop_is_length(tiny: RiggedTinyLlama, backend: HfBackend) -> None:
    cap = min(e for e in tiny.expected_tokens if e is not None) - 1
    gens = await backend.generate(PROMPTS, cap)
    assert [(g.finish_reason, g.tokens) for g in gens] == [("length", cap)] * len(PROMPTS)


async def test_stopped_text_has_no_eos_and_is_shorter(
    tiny: RiggedTinyLlama, backend: HfBackend, one_by_one: list[Generation]
) -> None:
    pinned = await _started(tiny.model.path, ignore_eos=True)
    try:
        full = await pinned.generate(PROMPTS, STEPS)
    finally:
        await pinned.close()
    assert [(g.finish_reason, g.tokens) for g in full] == [("length", STEPS)] * len(PROMPTS)
    for short, long in zip(one_by_one, full, strict=True):
        assert "<|eos|>" not in short.text
        if short.finish_reason == "length":
            assert short.text == long.text
        else:
            assert len(short.text) < len(long.text)


async def test_too_long_input_fails_alone(tiny: RiggedTinyLlama, backend: HfBackend) -> None:
    huge = "Human user:\n" + "how do I bake bread at home? " * 200
    gens = await backend.generate([PROMPTS[0], huge, PROMPTS[2]], STEPS)
    assert gens[1].finish_reason == "error" and gens[1].text == ""
    assert gens[1].retryable is False  # the same input fails the same way again
    assert gens[1].error is not None and f"{tiny.model.max_positions} positions" in gens[1].error
    alone = [(await backend.generate([p], STEPS))[0] for p in (PROMPTS[0], PROMPTS[2])]
    assert [gens[0], gens[2]] == alone


async def test_event_loop_stays_free_and_calls_queue(
    backend: HfBackend, one_by_one: list[Generation]
) -> None:
    ticks = 0
    task = asyncio.gather(backend.generate(PROMPTS, STEPS), backend.generate(PROMPTS[:2], STEPS))
    while not task.done():
        await asyncio.sleep(0.001)
        ticks += 1
    first, second = await task
    assert ticks >= 3, "the event loop was blocked while the model ran"
    assert first == one_by_one and second == one_by_one[:2]


async def test_lifecycle_errors(tiny: RiggedTinyLlama) -> None:
    b = HfBackend(tiny.model.path, device="cpu")
    with pytest.raises(BackendError, match="not started"):
        await b.generate(["hi"], 4)
    await b.start()
    assert await b.generate([], 4) == []
    with pytest.raises(ValueError, match="max_new_tokens"):
        await b.generate(["hi"], 0)
    await b.close()
    with pytest.raises(BackendError, match="not started"):
        await b.generate(["hi"], 4)
    with pytest.raises(ValueError, match="max_batch_size"):
        HfBackend(tiny.model.path, max_batch_size=0)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        HfBackend(tiny.model.path / "missing")


def test_ids_and_revision(tiny: RiggedTinyLlama, tmp_path: Path) -> None:
    b = HfBackend(tiny.model.path)
    assert b.name == "hf" and b.model_id == tiny.model.path.name
    assert b.revision.startswith("sha256:") and len(b.revision) == len("sha256:") + 12
    assert HfBackend(tiny.model.path, "org/guard", "v7").revision == "v7"
    # Same config.json, other weights: another revision.
    other = build_tiny_llama(tmp_path / "other", seed=1)
    assert (tmp_path / "other" / "config.json").read_bytes() == (
        tiny.model.path / "config.json"
    ).read_bytes()
    assert checkpoint_revision(other.path) != b.revision
    # A hub-cache snapshot names the repository and the commit.
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "models--acme--Guard-1B" / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"model_type": "llama"}))
    s = HfBackend(snap)
    assert (s.model_id, s.revision) == ("acme/Guard-1B", commit)


async def test_garbage_output_is_unparsed_not_an_exception(
    one_by_one: list[Generation], backend: HfBackend
) -> None:
    parser = pytest.importorskip(
        "engine.parser", reason="engine/parser.py is not written yet (another engineer's module)"
    )
    longer = await backend.generate(PROMPTS[:3], 40)
    for gen in [*one_by_one, *longer]:
        assert parser.parse(gen.text).found == "unparsed"
