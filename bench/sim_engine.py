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
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace

from bench.backends import HashReplayBackend
from engine.backends.base import Generation, Stops
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


@dataclass(eq=False)
class _Sequence:
    prompt_tokens: int
    steps: int  # decode steps to run (its output's tokens)
    done: asyncio.Future[None]
    generated: int = 0

    @property
    def reserve(self) -> int:
        return self.prompt_tokens + self.steps


@dataclass
class EngineStats:
    steps: int = 0
    sequences: int = 0
    busy_s: float = 0.0  # simulated time spent in steps
    max_running: int = 0
    running_sum: int = field(default=0, repr=False)  # sum over steps of running sequences

    @property
    def mean_running(self) -> float:
        return self.running_sum / self.steps if self.steps else 0.0


class SimulatedInflightBackend(HashReplayBackend):
    """A `Backend` that answers with recorded outputs at the pace of `engine`'s model.

    `sleep` is how a step's time passes: `asyncio.sleep` (real time, to benchmark the service as
    if on the GPU) or a virtual clock's (tests, the capacity figure)."""

    name = "sim_inflight"

    def __init__(
        self,
        outputs: Sequence[str],
        engine: EngineModel,
        *,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        super().__init__(outputs, model_id=engine.model.name)
        self.engine = engine
        self.revision = f"{self.revision}+{engine.name}"
        self._sleep = sleep
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
        answers = [self.answer(x, max_new_tokens) for x in inputs]
        loop = asyncio.get_running_loop()
        seqs = [
            _Sequence(approx_tokens(x), max(1, a.tokens or 1), loop.create_future())
            for x, a in zip(inputs, answers, strict=True)
        ]
        self._waiting.extend(seqs)
        self._wake.set()
        await asyncio.gather(*(s.done for s in seqs))
        return answers

    def _admit(self) -> list[_Sequence]:
        engine, admitted = self.engine, []
        while self._waiting and len(self._running) < engine.max_sequences:
            seq = self._waiting[0]
            if self._running and self._reserved + seq.reserve > engine.kv_token_budget:
                break  # waits for KV memory (a lone sequence is always admitted)
            self._waiting.popleft()
            self._running.append(seq)
            self._reserved += seq.reserve
            admitted.append(seq)
        return admitted

    async def _run(self) -> None:
        engine = self.engine
        while True:
            if not self._running and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            admitted = self._admit()
            context = sum(s.prompt_tokens + s.generated for s in self._running)
            step = engine.step_s(context) + sum(engine.prefill_s(s.prompt_tokens) for s in admitted)
            await self._sleep(step)
            self.stats.steps += 1
            self.stats.busy_s += step
            self.stats.running_sum += len(self._running)
            self.stats.max_running = max(self.stats.max_running, len(self._running))
            still: list[_Sequence] = []
            for seq in self._running:
                seq.generated += 1
                if seq.generated >= seq.steps:
                    self._reserved -= seq.reserve
                    self.stats.sequences += 1
                    if not seq.done.done():
                        seq.done.set_result(None)
                else:
                    still.append(seq)
            self._running = still


class VirtualClock:
    """Simulated time for the engine loop: `sleep` advances it and yields once."""

    def __init__(self) -> None:
        self.now = 0.0

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


async def measure_capacity(
    engine: EngineModel, prompt: str, output: str, sequences: int
) -> tuple[float, EngineStats]:
    """Feed `sequences` copies of one request straight to a simulated engine, all at once, in
    virtual time: sequences finished per simulated second, and the engine's counters."""
    clock = VirtualClock()
    backend = SimulatedInflightBackend([output], engine, sleep=clock.sleep)
    await backend.start()
    try:
        inputs = [f"{prompt}\x00{i}" for i in range(sequences)]
        await backend.generate(inputs, max_new_tokens=10**6)
    finally:
        await backend.close()
    return sequences / clock.now, backend.stats


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
