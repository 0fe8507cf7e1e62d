"""The simulated in-flight engine (`bench.sim_engine`), in virtual time: it agrees with its own
cost model, it schedules each sequence on its own as an in-flight-batching engine does (and says
so: `batching`), honours stop strings, aborts cancelled calls and admits an open loop's requests
at their arrival times; on real time it keeps the model's pace."""

from __future__ import annotations

import asyncio

import pytest

from bench.backends import Counting, HashReplayBackend
from bench.sim_engine import (
    GPUS,
    MODELS,
    PRESET_NAMES,
    Arrival,
    SimulatedInflightBackend,
    VirtualClock,
    main,
    measure_capacity,
    open_loop,
    preset,
    preset_named,
)
from engine.backends.replay import approx_tokens
from engine.prompt import EARLY_EXIT_STOP


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
    backend = SimulatedInflightBackend(outputs, preset("1B", "H200"), clock=clock)

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


TASK1 = "# Task 1\n\n## Reasoning Step 1: the request.\n\nRequest: unharmful\n"
TASK2 = "\n# Task 2\n\n## Reasoning Step 1: the response.\n" + "more reasoning. " * 40


def test_it_batches_in_flight_and_counting_says_so() -> None:
    sim = SimulatedInflightBackend([TASK1], preset("1B", "H200"), clock=VirtualClock())
    assert SimulatedInflightBackend.batching == "inflight" and sim.batching == "inflight"
    assert Counting(sim, salt="x").batching == "inflight"  # the guard's `auto` sees through it
    assert isinstance(Counting(sim), Counting)
    assert Counting(HashReplayBackend([TASK1])).batching == "static"


async def test_a_stop_string_cuts_the_output_and_its_decode_steps() -> None:
    full_text = TASK1 + TASK2
    engine = preset("1B", "H200")
    clock = VirtualClock()
    backend = SimulatedInflightBackend([full_text], engine, clock=clock)
    await backend.start()
    try:
        (cut,) = await backend.generate(["a prompt"], 4096, [EARLY_EXIT_STOP])
        cut_steps, cut_time = backend.stats.steps, clock.now
        (full,) = await backend.generate(["a prompt"], 4096, [None])
        full_steps = backend.stats.steps - cut_steps
    finally:
        await backend.close()
    assert cut.text == TASK1 and cut.finish_reason == "stop"  # the stop string left out
    assert cut.tokens == approx_tokens(TASK1 + EARLY_EXIT_STOP)  # ... but decoded
    assert cut_steps == cut.tokens
    assert full.text == full_text and full_steps == approx_tokens(full_text) > 3 * cut_steps
    assert clock.now - cut_time > 3 * cut_time  # fewer steps: sooner done


async def test_a_cancelled_call_leaves_the_engine_at_once() -> None:
    clock = VirtualClock()
    backend = SimulatedInflightBackend(["L" * 4 * 2000], preset("8B", "H100"), clock=clock)
    await backend.start()
    try:
        call = asyncio.create_task(backend.generate(["long"], 4096))
        while backend.stats.steps < 5:
            await asyncio.sleep(0)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert backend.stats.aborted == 1
        assert not backend._running and not backend._waiting and backend._reserved == 0
        steps = backend.stats.steps
        await backend.generate(["next"], 3)  # the place is free: runs alone, 3 steps
        assert backend.stats.steps - steps == 3 and backend.stats.max_running == 1
    finally:
        await backend.close()


async def test_open_loop_admits_each_request_at_its_arrival() -> None:
    engine = preset("8B", "H100")
    output = "y" * 4 * 100  # 100 decode steps
    prompt = "x" * 4 * 50
    alone, _ = await open_loop(engine, [output], [Arrival(5.0, prompt)], 4096)
    ((arrived, finished),) = alone
    one = (
        engine.prefill_s(50) + engine.step_s(50) + sum(engine.step_s(50 + i) for i in range(1, 100))
    )
    assert arrived == 5.0 and finished - arrived == pytest.approx(one, rel=1e-6)
    # a second request long after the first has ended: it waits for nothing
    two, stats = await open_loop(
        engine, [output], [Arrival(0.0, prompt), Arrival(60.0, prompt)], 4096
    )
    assert [b - a for a, b in two] == [pytest.approx(one, rel=1e-6)] * 2
    assert stats.max_running == 1
    # at the same time: they share the steps (each a bit slower, both far sooner than in turn)
    both, stats = await open_loop(
        engine, [output], [Arrival(0.0, prompt), Arrival(0.0, prompt)], 4096
    )
    assert stats.max_running == 2 and one < both[0][1] < 1.2 * one


async def test_real_time_steps_keep_the_models_pace() -> None:
    engine = preset("1B", "H200")
    backend = SimulatedInflightBackend(["y" * 4 * 60], engine)  # RealClock
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        (gen,) = await backend.generate(["a prompt"], 4096)
    finally:
        await backend.close()
    took = loop.time() - began
    assert gen.tokens == 60 and backend.stats.steps == 60
    assert took >= backend.stats.busy_s * 0.99  # never faster than the model
    assert took < backend.stats.busy_s + 2.0  # a loop's late wake-ups are not added up


def test_presets_by_name() -> None:
    assert preset_named("8B-H100") == preset("8B", "H100")
    assert preset_named("1b-h200").name == "sim:GuardReasoner-1B@H200 SXM"
    assert len(PRESET_NAMES) == len(MODELS) * len(GPUS)
    with pytest.raises(ValueError, match="8B-H100"):
        preset_named("70B-H100")
