"""5. Engine utilisation (issue 17): how much of an in-flight-batching engine the service uses.

The engine is `bench.sim_engine`'s simulated one (a preset such as GuardReasoner-8B on an H100),
measured twice on the same requests (`bench.workload`) at the same offered loads:

- **alone**, in virtual time (exact, no Kafka): its capacity for the mix (every request queued
  at once; finishes per second between the 10th and the 90th percentile of the finishes), then
  an open loop: each request handed over on its own at its Poisson arrival time, latency from
  arrival to its last decode step;
- **through the service**: a real worker (`bench.worker`, the `guardstream serve` code path) on
  the same engine in real time, on fresh topics of the local Kafka, default settings but for
  the admission mode under test (cache on, with a fresh salt: no hits), the bench producing the
  events at the same times and reading the verdicts; latency from the produce call to the
  verdict's receipt.

The levels run back to back on one worker per admission mode (a level's last, longest
generations finish during the next one's start, alike in both measurements); a level's
delivered throughput is the verdicts that arrived from `settle` seconds into it (past the
change of load: a verdict comes seconds after its request) to its end, per second.
The service's verdicts leave each input partition in offset order, so a verdict also waits for
every earlier one of its partition: `p99_guard_ms` is the p99 of the guard's own share (the
verdict's batch wait and model call, from its headers), and `engine_done_rate` what the engine
inside the worker finished per second (its own counter): beside the delivered rate they tell the
engine's work from the wait for earlier offsets.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from bench.data import recorded_outputs
from bench.kafka_io import Collector, new_producer
from bench.runs import Env, Target, worker_target
from bench.sim_engine import Arrival, EngineModel, open_loop, preset_named
from bench.stats import percentile
from bench.workload import Event, Mix, Workload, conversation_pairs, levels_schedule

Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Mode:
    """An admission mode under test: `batch` (micro-batches of size x in flight) or `request`
    (each miss on its own, `sequences` at a time)."""

    admission: str
    batch_size: int = 32
    in_flight: int = 2
    sequences: int = 256

    @property
    def label(self) -> str:
        if self.admission == "request":
            return f"request {self.sequences}"
        return f"batch {self.batch_size}x{self.in_flight}"

    def settings(self) -> dict[str, Any]:
        if self.admission == "request":
            return {"admission": "request", "engine_max_sequences": self.sequences}
        return {
            "admission": "batch",
            "batch_max_size": self.batch_size,
            "batch_max_in_flight": self.in_flight,
        }


def parse_modes(text: str, engine: EngineModel) -> list[Mode]:
    """`batch:32x2,batch:8x32,request` (a bare `request` gets the preset's max sequences,
    `request:N` N of them)."""
    modes = []
    for raw in (part.strip() for part in text.split(",")):
        if not raw:
            continue
        kind, _, arg = raw.partition(":")
        try:
            if kind == "request":
                modes.append(Mode("request", sequences=int(arg) if arg else engine.max_sequences))
            elif kind == "batch":
                size, _, k = arg.partition("x")
                modes.append(Mode("batch", batch_size=int(size), in_flight=int(k)))
            else:
                raise ValueError(kind)
        except ValueError:
            raise ValueError(
                f"--util-modes: {raw!r} is not batch:SIZExIN_FLIGHT, request or request:N"
            ) from None
    if not modes:
        raise ValueError("--util-modes: no mode given")
    return modes


@dataclass
class UtilisationPlan:
    """The knobs of the utilisation run (see `bench.cli`'s --util-* options)."""

    preset: str
    mix: Mix
    modes: str
    loads: list[float]
    level_seconds: float
    settle_seconds: float
    drain_seconds: float
    max_new_tokens: int
    max_text_chars: int
    early_exit: bool
    capacity_sample: int
    seed: int
    warmup_turns: int
    outputs_root: Path  # predictions/<model size>/ below it: the preset's recorded outputs
    bench_env: dict[str, str] = field(default_factory=dict)


def _level_figures(
    events: Sequence[Event],
    times: dict[str, tuple[float, float]],  # event id -> (sent, done), seconds from the start
    level: int,
    seconds: float,
    settle: float,
    end_of_wait: float,
    guard_ms: dict[str, float] | None = None,  # event id -> batch wait + model call
) -> dict[str, Any]:
    """One level's figures, alike for the engine alone and the service: offered and delivered
    rates, latency percentiles (an event never delivered counts as waiting until `end_of_wait`:
    then the percentiles are lower bounds), and how many events were sent by the level's end
    but not answered then (in the engine, or queued before it: by Little's law about rate x
    latency while it keeps up, growing when it does not)."""
    mine = [e for e in events if e.level == level]
    start, stop = level * seconds, (level + 1) * seconds
    latency = [
        (times[e.id][1] - times[e.id][0]) * 1000 if e.id in times else (end_of_wait - e.at) * 1000
        for e in mine
    ]
    in_window = sum(1 for _, done in times.values() if start + settle <= done < stop)
    answered = sum(1 for _, done in times.values() if done < stop)
    figures: dict[str, Any] = {}
    if guard_ms is not None:
        own = [guard_ms[e.id] for e in mine if e.id in guard_ms]
        figures["p99_guard_ms"] = round(percentile(own, 99), 1) if own else None
    return {
        **figures,
        "events": len(mine),
        "offered_rate": round(len(mine) / seconds, 2),
        "delivered_rate": round(in_window / (seconds - settle), 2),
        "undelivered": sum(1 for e in mine if e.id not in times),
        "outstanding_at_end": sum(1 for e in events if e.at < stop) - answered,
        "p50_ms": round(percentile(latency, 50), 1),
        "p99_ms": round(percentile(latency, 99), 1),
    }


def _arrivals(plan: UtilisationPlan, events: Sequence[Event]) -> list[Arrival]:
    return [e.arrival(max_chars=plan.max_text_chars, early_exit=plan.early_exit) for e in events]


def engine_capacity(
    engine: EngineModel, outputs: Sequence[str], plan: UtilisationPlan, sample: Sequence[Event]
) -> tuple[float, dict[str, Any]]:
    """The engine fed directly with every request of `sample` at once, in virtual time: its
    capacity for the mix (finishes per second between the 10th and the 90th percentile of the
    finishes, clear of the start and of the tail) and what that run measured."""
    done, stats = asyncio.run(
        open_loop(engine, outputs, _arrivals(plan, sample), plan.max_new_tokens)
    )
    finishes = sorted(end for _, end in done)
    lo, hi = int(0.1 * len(finishes)), int(0.9 * len(finishes))
    capacity = (hi - lo) / (finishes[hi] - finishes[lo])
    return capacity, {
        "sample": len(sample),
        "makespan_s": round(finishes[-1], 2),
        "mean_running": round(stats.mean_running, 1),
        "max_running": stats.max_running,
        "mean_decode_steps": round(stats.running_sum / max(1, len(sample)), 1),
    }


def engine_levels(
    engine: EngineModel, outputs: Sequence[str], plan: UtilisationPlan, events: Sequence[Event]
) -> list[dict[str, Any]]:
    """The engine fed directly with `events`, each on its own at its time, in virtual time:
    each level's figures."""
    done, _ = asyncio.run(open_loop(engine, outputs, _arrivals(plan, events), plan.max_new_tokens))
    times = {e.id: pair for e, pair in zip(events, done, strict=True)}
    end = max((d for _, d in done), default=0.0)
    return [
        _level_figures(events, times, i, plan.level_seconds, plan.settle_seconds, end)
        for i in range(len(plan.loads))
    ]


async def _send(producer: AIOKafkaProducer, target: Target, e: Event) -> float:
    """Produce `e` (a response to the responses topic, keyed like its prompt: by
    conversation); returns when it was handed to the producer."""
    topic = target.input_topic
    if e.is_response:
        assert target.responses_topic is not None
        topic = target.responses_topic
    at = time.time()
    await producer.send(topic, e.value(), key=e.conversation.encode())
    return at


@dataclass
class Session:
    """What one worker's run measured; times in seconds from the schedule's start."""

    times: dict[str, tuple[float, float]]  # event id -> (sent, verdict received)
    guard_ms: dict[str, float]  # event id -> the verdict's batch wait + model call (headers)
    snapshots: list[dict[str, Any]]  # the worker's counters: start, each level's end, the end
    waited: float  # when the bench stopped waiting for verdicts
    complete: bool  # a verdict for every event


async def _session(
    env: Env,
    target: Target,
    plan: UtilisationPlan,
    warm: Sequence[Event],
    events: Sequence[Event],
    say: Say,
) -> Session:
    """Warm up, send `events` on their schedule, wait for the verdicts (see `Session`)."""
    assert target.worker is not None
    collector = Collector(
        env.bootstrap, target.output_topic, env.partitions, keep_values=True, by_source_id=True
    )
    await collector.start()
    producer = new_producer(env.bootstrap)
    await producer.start()
    try:
        for e in warm:
            await _send(producer, target, e)
        if not await collector.wait_for([e.id.encode() for e in warm], timeout=120):
            tail = target.worker.tail()
            raise RuntimeError(f"utilisation: warm-up verdicts did not arrive\n{tail}")
        sent: dict[str, float] = {}
        t0 = time.time()
        snapshots = [_snapshot(target, t0)]
        for e in events:
            while e.level >= len(snapshots):  # a level ended: the worker's counters then
                await _sleep_until(t0 + len(snapshots) * plan.level_seconds)
                snapshots.append(_snapshot(target, t0))
            await _sleep_until(t0 + e.at)
            sent[e.id] = await _send(producer, target, e)
        await producer.flush()
        while len(snapshots) <= len(plan.loads):
            await _sleep_until(t0 + len(snapshots) * plan.level_seconds)
            snapshots.append(_snapshot(target, t0))
        say(f"    sent {len(sent)} events; waiting for the last verdicts")
        await _drain(collector, [k.encode() for k in sent], plan.drain_seconds)
        waited = time.time() - t0
        times, guard_ms = {}, {}
        for k, at in sent.items():
            rec = collector.records.get(k.encode())
            if rec is not None:
                times[k] = (at - t0, rec.at - t0)
                guard_ms[k] = sum(
                    float(rec.headers.get(h, b"0") or 0)
                    for h in ("guardstream-batch-wait-ms", "guardstream-generate-ms")
                )
        await asyncio.sleep(0.3)  # the worker's counters are written every 0.2 s
        snapshots.append(_snapshot(target, t0))  # after the wait: the whole run's model calls
        return Session(times, guard_ms, snapshots, waited, len(times) == len(events))
    finally:
        await producer.stop()
        await collector.stop()


async def _sleep_until(at: float) -> None:
    delay = at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _drain(collector: Collector, keys: Sequence[bytes], seconds: float) -> bool:
    """Wait for every verdict, for at most `seconds`, and no longer once the pace they arrive
    at says the rest cannot arrive in time (an overloaded mode's backlog of minutes)."""
    deadline = time.monotonic() + seconds
    recent: list[tuple[float, int]] = []  # (when, verdicts still missing), the last 5 s
    while True:
        now = time.monotonic()
        left = sum(1 for k in keys if k not in collector.records)
        if left == 0:
            return True
        if now >= deadline:
            return False
        recent = [(t, n) for t, n in recent if now - t <= 5.0] + [(now, left)]
        since, before = recent[0]
        if now - since >= 3.0 and before > left:
            pace = (before - left) / (now - since)
            if left / pace > 3 * (deadline - now):
                return False
        await asyncio.sleep(0.5)


def _snapshot(target: Target, t0: float) -> dict[str, Any]:
    assert target.worker is not None
    return {
        "at": time.time() - t0,
        "worker": target.worker.stats(),
        "worker_cpu_s": target.proc.cpu_seconds(),
        "bench_cpu_s": time.process_time(),
        "loadavg_1m": os.getloadavg()[0],
    }


def _counters(before: dict[str, Any], after: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The worker's model calls and engine counters over one level, and how busy the CPUs
    were (the worker's and the bench's share of one core, the machine's load average)."""
    b, a = before["worker"], after["worker"]
    eb, ea = b.get("engine", {}), a.get("engine", {})

    def delta(new: dict[str, Any], old: dict[str, Any], key: str) -> float:
        return float(new.get(key, 0)) - float(old.get(key, 0))

    calls, inputs, steps = delta(a, b, "calls"), delta(a, b, "inputs"), delta(ea, eb, "steps")
    clock = delta(ea, eb, "clock_s")
    return {
        "model_calls": int(calls),
        "model_inputs": int(inputs),
        "mean_call_size": round(inputs / calls, 2) if calls else 0.0,
        "engine_mean_running": round(delta(ea, eb, "running_sum") / steps, 1) if steps else 0.0,
        "engine_done_rate": round(delta(ea, eb, "sequences") / clock, 2) if clock > 0 else 0.0,
        # of the engine's own time between the two counters' dumps (written every 0.2 s)
        "engine_busy": round(delta(ea, eb, "busy_s") / clock, 3) if clock > 0 else 0.0,
        "engine_lag_mean_ms": round(delta(ea, eb, "lag_sum_s") / steps * 1000, 2) if steps else 0.0,
        "engine_lag_max_ms": round(float(ea.get("lag_max_s", 0.0)) * 1000, 1),
        "worker_cpu": round((after["worker_cpu_s"] - before["worker_cpu_s"]) / seconds, 3),
        "bench_cpu": round((after["bench_cpu_s"] - before["bench_cpu_s"]) / seconds, 3),
        "loadavg_1m": round(after["loadavg_1m"], 2),
    }


def _settings(plan: UtilisationPlan, mode: Mode) -> dict[str, Any]:
    return {
        "max_new_tokens": plan.max_new_tokens,
        "max_text_chars": plan.max_text_chars,
        "early_exit": plan.early_exit,
        **mode.settings(),
    }


def utilisation(env: Env, plan: UtilisationPlan, shared: Path, say: Say) -> dict[str, Any]:
    """The engine alone and the service on it, per admission mode, at every offered load."""
    engine = preset_named(plan.preset)
    modes = parse_modes(plan.modes, engine)
    outputs_dir = plan.outputs_root / engine.model.name.rsplit("-", 1)[-1]
    outputs = recorded_outputs(outputs_dir)
    pairs = conversation_pairs(shared)
    sample = Workload(pairs, plan.mix, "cap").at_once(plan.capacity_sample)
    capacity, measured = engine_capacity(engine, outputs, plan, sample)
    rates = [load * capacity for load in plan.loads]
    events = levels_schedule(Workload(pairs, plan.mix, "u"), rates, plan.level_seconds, plan.seed)
    alone = engine_levels(engine, outputs, plan, events)
    say(
        f"  engine {engine.name}: capacity {capacity:.1f} verdicts/s for the {plan.mix} mix; "
        f"{len(events)} events over {len(rates)} levels of {plan.level_seconds:g} s"
    )
    for load, row in zip(plan.loads, alone, strict=True):
        say(f"    alone at {load:.0%}: {row['delivered_rate']}/s, p99 {row['p99_ms']} ms")
    bench_env = {
        "GUARDSTREAM_BENCH_BACKEND": "sim_inflight",
        "GUARDSTREAM_BENCH_OUTPUTS": str(outputs_dir),
        "GUARDSTREAM_BENCH_SIM_PRESET": plan.preset,
        **plan.bench_env,
    }
    results = []
    for mode in modes:
        say(f"  {mode.label}")
        warm_load = Workload(pairs, plan.mix, "w")
        warm_load.turns = len(pairs) * 1000  # texts that never occur in the schedule
        warm = [e for _ in range(plan.warmup_turns) for e in warm_load.turn(0.0, -1)]
        with worker_target(env, _settings(plan, mode), bench_env) as target:
            run = asyncio.run(_session(env, target, plan, warm, events, say))
            if not run.complete:
                target.proc.kill()  # an overloaded backlog: no graceful drain of minutes
        times, snaps = run.times, run.snapshots
        rows = []
        for i, load in enumerate(plan.loads):
            row = _level_figures(
                events, times, i, plan.level_seconds, plan.settle_seconds, run.waited, run.guard_ms
            )
            engine_row = alone[i]
            row.update(
                load=load,
                ratio_capacity=round(row["delivered_rate"] / capacity, 3),
                engine_delivered_rate=engine_row["delivered_rate"],
                engine_p50_ms=engine_row["p50_ms"],
                engine_p99_ms=engine_row["p99_ms"],
                p99_ratio=round(row["p99_ms"] / engine_row["p99_ms"], 3),
                **_counters(snaps[i], snaps[i + 1], plan.level_seconds),
            )
            rows.append(row)
            say(
                f"    {load:.0%}: delivered {row['delivered_rate']}/s "
                f"({row['ratio_capacity']:.2f} of capacity; the engine finished "
                f"{row['engine_done_rate']}/s), p99 {row['p99_ms']} ms, guard's share "
                f"{row['p99_guard_ms']} ms (engine alone {engine_row['p99_ms']} ms), running "
                f"{row['engine_mean_running']}"
            )
        whole = _counters(snaps[0], snaps[-1], snaps[-1]["at"] - snaps[0]["at"])
        results.append(
            {
                "mode": mode.label,
                "settings": mode.settings(),
                "sent": len(events),
                "delivered": len(times),
                "complete": run.complete,
                # every event a cache miss: as many model inputs, more where early exit's
                # Task 1 could not be read and the request was generated again in full
                "model_inputs": whole["model_inputs"],
                "model_calls": whole["model_calls"],
                "rows": rows,
            }
        )
    return {
        "preset": plan.preset,
        "engine": engine.name,
        "max_sequences": engine.max_sequences,
        "mix": plan.mix,
        "early_exit": plan.early_exit,
        "max_new_tokens": plan.max_new_tokens,
        "outputs": str(outputs_dir),
        "capacity": round(capacity, 2),
        "capacity_run": measured,
        "loads": plan.loads,
        "level_seconds": plan.level_seconds,
        "settle_seconds": plan.settle_seconds,
        "seed": plan.seed,
        "engine_alone": [
            {"load": load, **row} for load, row in zip(plan.loads, alone, strict=True)
        ],
        "modes": results,
        "goals": goals(results, plan.loads),
    }


def goals(modes: Sequence[dict[str, Any]], loads: Sequence[float]) -> dict[str, Any]:
    """Issue 17's goals, per mode: at saturation (the highest load) the service delivers at
    least 0.9 of the engine's capacity; at 50% load its p99 is within 1.5x the engine's own."""
    out: dict[str, Any] = {}
    top = max(loads) if loads else None
    for m in modes:
        by_load = {r["load"]: r for r in m["rows"]}
        sat = by_load.get(top) if top is not None and top >= 1.0 else None
        half = by_load.get(0.5)
        out[m["mode"]] = {
            "saturation_ratio": sat["ratio_capacity"] if sat else None,
            "saturation_met": sat["ratio_capacity"] >= 0.9 if sat else None,
            "p99_ratio_at_50": half["p99_ratio"] if half else None,
            "p99_met": half["p99_ratio"] <= 1.5 if half else None,
        }
    return out
