"""A SIMULATED in-flight-batching engine, for benchmarks only: no model runs, no GPU is used.

It behaves as TensorRT-LLM's (or vLLM's) scheduler does, on a model of the GPU's decode cost:

- every decode step advances each running sequence by one token; a step lasts
  ``overhead + (weight bytes + KV bytes of every running sequence's context) / (bandwidth *
  efficiency)`` (decode is bound by reading the weights and the KV cache once per step);
- a sequence admitted at a step boundary pays its prefill in that step, compute-bound:
  ``2 * parameters * prompt tokens / (peak FLOP/s * prefill MFU)``;
- waiting sequences are admitted at step boundaries while fewer than `max_sequences` run and their
  KV cache (prompt plus the token cap) fits in the memory left after the weights; a finished
  sequence frees its place at once, for the next step.

Each sequence's output and its length come from the recorded GuardReasoner outputs
(`bench.backends.HashReplayBackend`: the same input always gets the same real output; tokens are
the replay's approximation, one per four characters). `generate` returns when the last sequence of
its call has finished, so a caller that sends fixed batches waits for each batch's longest
output, exactly as the guard's batcher does on a real in-flight engine.

Constants (`PRESETS`): the models' shapes are those of their Llama 3.x `config.json` (parameters,
layers, KV heads, head dimension; bf16, 2 bytes per value); the GPUs' memory, bandwidth and
peak bf16 dense FLOP/s are NVIDIA's datasheet figures (H100 SXM5: 80 GB HBM3, 3.35 TB/s, 989
TFLOP/s; H200 SXM: 141 GB HBM3e, 4.8 TB/s, 989 TFLOP/s). Three are assumptions, not
measurements, until a GPU run replaces them: decode reaches 70% of the bandwidth roofline, prefill
50% of peak FLOP/s, and a step costs 1 ms more than its memory traffic (kernel launches,
scheduling); `max_sequences` is 256 (a TensorRT-LLM engine's `max_batch_size` as the chart sets
it). `python -m bench.sim_engine` prints each preset's capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar, Protocol

from bench.backends import HashReplayBackend
from engine.backends.base import Batching, Generation, Stops
from engine.backends.replay import approx_tokens

GB = 1e9
TB_S = 1e12
TFLOP_S = 1e12


@dataclass(frozen=True, slots=True)
class ModelShape:
    name: str
    parameters: float
    layers: int
    kv_heads: int
    head_dim: int
    bytes_per_value: int = 2  # bf16

    @property
    def weight_bytes(self) -> float:
        return self.parameters * self.bytes_per_value

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_value  # K and V


@dataclass(frozen=True, slots=True)
class Gpu:
    name: str
    memory_bytes: float
    bandwidth: float  # bytes/s
    flops: float  # peak bf16 dense FLOP/s


#: Llama 3.x shapes (config.json of Llama-3.2-1B, -3.2-3B, -3.1-8B: GuardReasoner's bases).
MODELS = {
    "1B": ModelShape("GuardReasoner-1B", 1.236e9, layers=16, kv_heads=8, head_dim=64),
    "3B": ModelShape("GuardReasoner-3B", 3.213e9, layers=28, kv_heads=8, head_dim=128),
    "8B": ModelShape("GuardReasoner-8B", 8.030e9, layers=32, kv_heads=8, head_dim=128),
}
GPUS = {
    "H100": Gpu("H100 SXM5", 80 * GB, 3.35 * TB_S, 989 * TFLOP_S),
    "H200": Gpu("H200 SXM", 141 * GB, 4.8 * TB_S, 989 * TFLOP_S),
}


@dataclass(frozen=True, slots=True)
class EngineModel:
    """The cost model of one model on one GPU; every figure the simulation uses is here."""

    model: ModelShape
    gpu: Gpu
    decode_efficiency: float = 0.7  # assumed: achieved / bandwidth roofline per decode step
    prefill_mfu: float = 0.5  # assumed: achieved / peak FLOP/s in prefill
    step_overhead_s: float = 1e-3  # assumed: launches and scheduling per step
    max_sequences: int = 256
    kv_memory_fraction: float = 0.9  # of the memory left after the weights

    @property
    def name(self) -> str:
        return f"sim:{self.model.name}@{self.gpu.name}"

    @property
    def kv_token_budget(self) -> int:
        free = self.gpu.memory_bytes * self.kv_memory_fraction - self.model.weight_bytes
        return max(0, int(free // self.model.kv_bytes_per_token))

    def step_s(self, context_tokens: int) -> float:
        """One decode step with `context_tokens` of KV cache read across the running ones."""
        traffic = self.model.weight_bytes + self.model.kv_bytes_per_token * context_tokens
        return self.step_overhead_s + traffic / (self.gpu.bandwidth * self.decode_efficiency)

    def prefill_s(self, prompt_tokens: int) -> float:
        return 2 * self.model.parameters * prompt_tokens / (self.gpu.flops * self.prefill_mfu)

    def steady_capacity(self, prompt_tokens: int, output_tokens: int) -> float:
        """Sequences per second at saturation for identical requests (the analytic figure the
        simulation must agree with): `slots` sequences decode together, each over
        `output_tokens` steps whose KV context grows from the prompt to prompt plus output, and
        each pays its prefill once."""
        reserve = prompt_tokens + output_tokens
        slots = min(self.max_sequences, self.kv_token_budget // max(1, reserve))
        if slots < 1:
            return 0.0
        mean_context = slots * (prompt_tokens + (output_tokens - 1) / 2)
        cycle = output_tokens * self.step_s(round(mean_context)) + slots * self.prefill_s(
            prompt_tokens
        )
        return slots / cycle


def preset(model: str, gpu: str, **changes: float) -> EngineModel:
    return replace(EngineModel(MODELS[model], GPUS[gpu]), **changes)  # type: ignore[arg-type]


PRESET_NAMES = [f"{m}-{g}" for m in MODELS for g in GPUS]


def preset_named(name: str) -> EngineModel:
    """A preset by its short name, MODEL-GPU: `8B-H100`, `1B-H200`, ... (see PRESET_NAMES)."""
    model, _, gpu = name.strip().upper().partition("-")
    if model not in MODELS or gpu not in GPUS:
        raise ValueError(
            f"unknown simulated engine preset {name!r}; expected one of {PRESET_NAMES}"
        )
    return preset(model, gpu)


@dataclass(eq=False)
class _Sequence:
    prompt_tokens: int
    steps: int  # decode steps to run (its output's tokens)
    done: asyncio.Future[None]
    arrival: float  # on the engine's clock: admitted at the first step boundary from then
    generated: int = 0
    finished: float = math.nan  # on the engine's clock: the end of its last step

    @property
    def reserve(self) -> int:
        return self.prompt_tokens + self.steps


@dataclass
class EngineStats:
    steps: int = 0
    sequences: int = 0
    aborted: int = 0  # sequences whose call was cancelled before they finished
    busy_s: float = 0.0  # simulated time spent in steps
    max_running: int = 0
    running_sum: int = field(default=0, repr=False)  # sum over steps of running sequences
    #: real time only: how late the step results were delivered, summed and at most (the
    #: event loop was busy elsewhere when a step ended; the next step is not delayed by it)
    lag_sum_s: float = 0.0
    lag_max_s: float = 0.0

    @property
    def mean_running(self) -> float:
        return self.running_sum / self.steps if self.steps else 0.0


class Clock(Protocol):
    """The time a simulated engine runs on."""

    def time(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class RealClock:
    """Wall time (monotonic): the engine paces the service as the GPU would."""

    def time(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class VirtualClock:
    """Simulated time for the engine loop: `sleep` advances it and yields once."""

    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


class SimulatedInflightBackend(HashReplayBackend):
    """A `Backend` that answers with recorded outputs at the pace of `engine`'s model.

    `clock` is how a step's time passes: `RealClock` (the default: to benchmark the service as
    if on the GPU) or a `VirtualClock` (tests, the engine-alone figures). On real time each step
    ends at its modelled time after the previous one, however late the event loop wakes (a GPU
    does not wait for the CPU's loop): a late wake-up delays the delivery of that step's
    results (`EngineStats.lag_*`), not the engine. A cancelled call's sequences leave the
    engine at once (an abort), freeing their places.

    `stop[i]` ends input i's recorded output before that string (the string is decoded, so its
    tokens count as decode steps, but left out of the text; see `HashReplayBackend.answer`)."""

    name = "sim_inflight"
    batching: ClassVar[Batching] = "inflight"

    def __init__(
        self,
        outputs: Sequence[str],
        engine: EngineModel,
        *,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(outputs, model_id=engine.model.name)
        self.engine = engine
        self.revision = f"{self.revision}+{engine.name}"
        self.clock: Clock = clock or RealClock()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._reserved = 0
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self.stats = EngineStats()

    async def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
        for seq in [*self._waiting, *self._running]:
            if not seq.done.done():
                seq.done.cancel()

    async def generate(
        self, inputs: Sequence[str], max_new_tokens: int, stop: Stops = None
    ) -> list[Generation]:
        await self.start()
        answers = self.answers(inputs, max_new_tokens, stop)
        now = self.clock.time()
        seqs = [self._enqueue(x, a, now) for x, a in zip(inputs, answers, strict=True)]
        try:
            await asyncio.gather(*(s.done for s in seqs))
        except BaseException:
            self._abort(seqs)
            raise
        return answers

    def _enqueue(self, model_input: str, answer: Generation, arrival: float) -> _Sequence:
        """Queue one sequence arriving at `arrival` (queued in arrival order)."""
        done = asyncio.get_running_loop().create_future()
        seq = _Sequence(approx_tokens(model_input), max(1, answer.tokens or 1), done, arrival)
        self._waiting.append(seq)
        self._wake.set()
        return seq

    def _abort(self, seqs: Sequence[_Sequence]) -> None:
        for seq in seqs:
            if seq.generated >= seq.steps:
                continue  # finished
            if seq in self._running:
                self._running.remove(seq)
                self._reserved -= seq.reserve
            elif seq in self._waiting:
                self._waiting.remove(seq)
            else:
                continue
            self.stats.aborted += 1
            if not seq.done.done():
                seq.done.cancel()

    def _admit(self, at: float) -> list[_Sequence]:
        """Sequences that arrived by `at` join the running ones, while places and KV memory
        last (a lone sequence is always admitted)."""
        engine, admitted = self.engine, []
        while self._waiting and len(self._running) < engine.max_sequences:
            seq = self._waiting[0]
            if seq.arrival > at:
                break
            if self._running and self._reserved + seq.reserve > engine.kv_token_budget:
                break  # waits for KV memory
            self._waiting.popleft()
            self._running.append(seq)
            self._reserved += seq.reserve
            admitted.append(seq)
        return admitted

    async def _run(self) -> None:
        engine, clock, stats = self.engine, self.clock, self.stats
        end = clock.time()  # when the last step ended
        while True:
            if not self._running and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            # a step starts when the last one ended; an idle engine starts at once, or when
            # the first waiting sequence arrives
            start = end if self._running else max(clock.time(), self._waiting[0].arrival)
            if start > clock.time():
                await clock.sleep(start - clock.time())
            admitted = self._admit(start)
            if not self._running:
                continue
            context = sum(s.prompt_tokens + s.generated for s in self._running)
            step = engine.step_s(context) + sum(engine.prefill_s(s.prompt_tokens) for s in admitted)
            end = start + step
            delay = end - clock.time()
            if delay > 0:
                await clock.sleep(delay)
            else:
                await asyncio.sleep(0)  # behind: deliver this step's results, then go on
            lag = max(0.0, clock.time() - end)
            stats.lag_sum_s += lag
            stats.lag_max_s = max(stats.lag_max_s, lag)
            stats.steps += 1
            stats.busy_s += step
            stats.running_sum += len(self._running)
            stats.max_running = max(stats.max_running, len(self._running))
            still: list[_Sequence] = []
            for seq in self._running:
                seq.generated += 1
                if seq.generated >= seq.steps:
                    seq.finished = end
                    self._reserved -= seq.reserve
                    stats.sequences += 1
                    if not seq.done.done():
                        seq.done.set_result(None)
                else:
                    still.append(seq)
            self._running = still


async def measure_capacity(
    engine: EngineModel, prompt: str, output: str, sequences: int
) -> tuple[float, EngineStats]:
    """Feed `sequences` copies of one request straight to a simulated engine, all at once, in
    virtual time: sequences finished per simulated second, and the engine's counters."""
    clock = VirtualClock()
    backend = SimulatedInflightBackend([output], engine, clock=clock)
    await backend.start()
    try:
        inputs = [f"{prompt}\x00{i}" for i in range(sequences)]
        await backend.generate(inputs, max_new_tokens=10**6)
    finally:
        await backend.close()
    return sequences / clock.now, backend.stats


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request of an open-loop run: when it reaches the engine, what it asks."""

    at: float  # seconds from the run's start
    model_input: str
    stop: str | None = None


async def open_loop(
    engine: EngineModel,
    outputs: Sequence[str],
    arrivals: Sequence[Arrival],
    max_new_tokens: int,
) -> tuple[list[tuple[float, float]], EngineStats]:
    """The engine alone, fed `arrivals` one request at a time at their times, in virtual time
    (exact: no event loop, no Kafka): each request's (arrival, finish), in the order given, and
    the engine's counters. All arrivals at 0 is the engine at saturation."""
    clock = VirtualClock()
    backend = SimulatedInflightBackend(outputs, engine, clock=clock)
    await backend.start()
    try:
        order = sorted(range(len(arrivals)), key=lambda i: arrivals[i].at)
        seqs: dict[int, _Sequence] = {}
        for i in order:
            a = arrivals[i]
            answer = backend.answer(a.model_input, max_new_tokens, a.stop)
            seqs[i] = backend._enqueue(a.model_input, answer, a.at)
        await asyncio.gather(*(s.done for s in seqs.values()))
    finally:
        await backend.close()
    return [(arrivals[i].at, seqs[i].finished) for i in range(len(arrivals))], backend.stats


def _capacity_table(prompt_tokens: int, output_tokens: int) -> list[str]:
    rows = [
        f"simulated in-flight engine, identical requests of {prompt_tokens} prompt and "
        f"{output_tokens} output tokens",
        f"{'preset':<34} {'slots':>6} {'1-seq step ms':>14} {'model seq/s':>12} {'simulated':>10}",
    ]
    prompt = "x" * (4 * prompt_tokens - 2)  # approx_tokens counts the "\x00i" suffix
    output = "y" * (4 * output_tokens)
    for model in MODELS:
        for gpu in GPUS:
            engine = preset(model, gpu)
            reserve = prompt_tokens + output_tokens
            slots = min(engine.max_sequences, engine.kv_token_budget // reserve)
            analytic = engine.steady_capacity(prompt_tokens, output_tokens)
            simulated, _ = asyncio.run(
                measure_capacity(engine, prompt, output, sequences=4 * slots)
            )
            rows.append(
                f"{engine.name:<34} {slots:>6} {engine.step_s(prompt_tokens) * 1000:>14.2f} "
                f"{analytic:>12.1f} {simulated:>10.1f}"
            )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sim_engine", description=__doc__)
    parser.add_argument("--prompt-tokens", type=int, default=400)
    parser.add_argument("--output-tokens", type=int, default=270)
    args = parser.parse_args(argv)
    if args.prompt_tokens < 1 or args.output_tokens < 1:
        parser.error("--prompt-tokens and --output-tokens must be >= 1")
    print("\n".join(_capacity_table(args.prompt_tokens, args.output_tokens)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
