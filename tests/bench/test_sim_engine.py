"""The simulated in-flight engine (`bench.sim_engine`), in virtual time: it agrees with its own
cost model, and it schedules each sequence on its own as an in-flight-batching engine does."""

from __future__ import annotations

import asyncio

import pytest

from bench.sim_engine import (
    GPUS,
    MODELS,
    SimulatedInflightBackend,
    VirtualClock,
    main,
    measure_capacity,
    preset,
)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("gpu", sorted(GPUS))
async def test_capacity_for_a_fixed_input_agrees_with_its_model_within_5_percent(
    model: str, gpu: str
) -> None:
    engine = preset(model, gpu)
    prompt_tokens, output_tokens = 400, 270
    prompt = "x" * (4 * prompt_tokens - 4)  # with the "\x00i" suffix: prompt_tokens tokens
    simulated, stats = await measure_capacity(
        engine, prompt, "y" * (4 * output_tokens), sequences=3 * engine.max_sequences
    )
    analytic = engine.steady_capacity(prompt_tokens, output_tokens)
    assert stats.sequences == 3 * engine.max_sequences
    assert stats.max_running == engine.max_sequences
    assert simulated == pytest.approx(analytic, rel=0.05)


def test_the_cost_model_reads_weights_and_kv_cache_once_per_step() -> None:
    engine = preset("8B", "H100")
    assert MODELS["8B"].kv_bytes_per_token == 131072  # 2 x 32 layers x 8 heads x 128 x 2 B
    one = engine.step_s(0)
    assert one == pytest.approx(1e-3 + 8.03e9 * 2 / (3.35e12 * 0.7))  # ~7.8 ms
    # 100k tokens of context add their KV bytes to the step's traffic
    assert engine.step_s(100_000) - one == pytest.approx(100_000 * 131072 / (3.35e12 * 0.7))
    assert preset("8B", "H200").step_s(0) < one  # more bandwidth, shorter steps


async def test_a_long_generation_does_not_hold_back_short_ones_sent_on_their_own() -> None:
    """Each sequence frees its place when it ends: short requests sent while a long one runs
    finish long before it; in one fixed batch with it, they wait for it."""
    clock = VirtualClock()
    long_text, short_text = "L" * 4 * 400, "S" * 4 * 20
    outputs = [long_text, short_text]
    backend = SimulatedInflightBackend(outputs, preset("1B", "H200"), sleep=clock.sleep)

    def inputs_for(text: str, n: int) -> list[str]:
        found, i = [], 0
        while len(found) < n:
            candidate = f"request {i}"
            if backend.answer(candidate, 10_000).text == text:
                found.append(candidate)
            i += 1
        return found

    (long_input,) = inputs_for(long_text, 1)
    shorts = inputs_for(short_text, 3)
    await backend.start()
    try:
        finished: dict[str, float] = {}

        async def send(name: str, batch: list[str]) -> None:
            await backend.generate(batch, 10_000)
            finished[name] = clock.now

        running = asyncio.create_task(send("long", [long_input]))
        while backend.stats.steps < 10:  # the long one is decoding
            await asyncio.sleep(0)
        await asyncio.gather(*(send(f"short{i}", [s]) for i, s in enumerate(shorts)))
        assert not running.done()
        await running
        assert max(finished[f"short{i}"] for i in range(3)) < finished["long"] / 10

        t0 = clock.now
        await send("batch", [long_input, *shorts])  # a fixed batch ends with its longest
        assert clock.now - t0 == pytest.approx(finished["long"], rel=0.05)
    finally:
        await backend.close()
    assert backend.stats.max_running == 4


def test_the_cli_prints_every_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--prompt-tokens", "100", "--output-tokens", "20"]) == 0
    out = capsys.readouterr().out
    for model in MODELS.values():
        for gpu in GPUS.values():
            assert f"sim:{model.name}@{gpu.name}" in out
    with pytest.raises(SystemExit):
        main(["--output-tokens", "0"])
