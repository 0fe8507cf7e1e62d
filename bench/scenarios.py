"""The four measurements: pipeline overhead, latency under load, batching, cache and dedupe."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bench.data import Message, repeat_stream, unique_stream
from bench.kafka_io import Received, created_at
from bench.runs import (
    Env,
    Target,
    Timed,
    baseline_target,
    run_capacity,
    run_messages,
    worker_target,
)
from bench.stats import mean, median, percentile

Say = Callable[[str], None]

#: The parts of a message's end-to-end latency (see `_split`).
PARTS = ("e2e", "batch_wait", "model", "worker", "inbound", "outbound", "overhead")


@dataclass
class Plan:
    """Every knob of a bench run (see `bench.cli` for what each means and its default)."""

    n: int
    rounds: int
    warmup: int
    batch_size: int
    max_wait_ms: float
    in_flight: int
    loads: list[float]
    load_seconds: float
    capacity_seconds: float
    settle_seconds: float
    sweep_sizes: list[int]
    sweep_waits: list[float]
    sweep_in_flight: list[int]
    sweep_seconds: float
    probe_seconds: float
    probe_start: float
    probe_step: float
    repeat_fractions: list[float]
    cache_modes: list[bool]
    cache_in_flight: int  # scenario 4: few enough batches in flight that the model is the limit
    model_env: dict[str, str]  # GUARDSTREAM_BENCH_* (and engine settings) of the model
    model_settings: dict[str, Any]
    overhead_env: dict[str, str]  # the model used by the overhead runs
    overhead_settings: dict[str, Any]
    cost_ms: Callable[[float], float] | None  # the stand-in's cost of a batch, when known


def _warm(prompts: Sequence[str], n: int, run: str) -> list[Message]:
    """Warm-up messages whose texts never occur in a measured stream."""
    return [
        Message(f"{run}-{i}", f"{run}-c{i}".encode(), f"[warm-up {i}] {prompts[i % len(prompts)]}")
        for i in range(n)
    ]


def _stamp() -> str:
    return f"{time.time_ns() % 10**12:x}"


# --- 1. pipeline overhead ------------------------------------------------------------------------


def overhead(env: Env, plan: Plan, prompts: Sequence[str], say: Say) -> dict[str, Any]:
    """The same `n` messages through the aiokafka baseline, a bare Faust agent (the floor of any
    Faust worker) and the worker (cache off and on), in alternating order, `rounds` times; end
    to end, first produce to last output."""
    configs: list[tuple[str, dict[str, Any] | None]] = [
        ("baseline", None),
        ("faust floor", None),
        ("worker cache off", {**plan.overhead_settings, "cache_enabled": False}),
        ("worker cache on", {**plan.overhead_settings, "cache_enabled": True}),
    ]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in configs}
    for rnd in range(plan.rounds):
        order = configs if rnd % 2 == 0 else configs[::-1]
        for name, settings in order:
            run = f"o{_stamp()}"
            messages = unique_stream(prompts, plan.n, run)
            warm = _warm(prompts, plan.warmup, f"w{run}")
            label = f"overhead {rnd + 1}/{plan.rounds}: {name}"
            if settings is None:
                with baseline_target(env, faust_floor=name == "faust floor") as target:
                    timed = run_messages(env, target, warm, messages, label=label)
            else:
                with worker_target(env, settings, plan.overhead_env) as target:
                    timed = run_messages(env, target, warm, messages, label=label)
            row = {
                "round": rnd + 1,
                "messages": timed.count,
                "complete": timed.complete,
                "seconds": round(timed.elapsed, 3),
                "rate": round(timed.rate, 1),
                "cpu_us_per_msg": round(timed.cpu_s / max(timed.count, 1) * 1e6, 1),
            }
            runs[name].append(row)
            say(f"  {label}: {row['rate']:.0f} msg/s, {row['cpu_us_per_msg']:.0f} us CPU/msg")
    summary = {
        name: {
            "median_rate": round(median([r["rate"] for r in rows]), 1),
            "min_rate": min(r["rate"] for r in rows),
            "max_rate": max(r["rate"] for r in rows),
            "median_cpu_us_per_msg": round(median([r["cpu_us_per_msg"] for r in rows]), 1),
        }
        for name, rows in runs.items()
    }
    base = summary["baseline"]["median_rate"]
    return {
        "n": plan.n,
        "rounds": plan.rounds,
        "runs": runs,
        "summary": summary,
        "ratio_cache_off": round(summary["worker cache off"]["median_rate"] / base, 4),
        "ratio_cache_on": round(summary["worker cache on"]["median_rate"] / base, 4),
        # the most a Faust agent reaches here, and how much of it the worker keeps
        "ratio_faust_floor": round(summary["faust floor"]["median_rate"] / base, 4),
        "ratio_cache_off_to_floor": round(
            summary["worker cache off"]["median_rate"] / summary["faust floor"]["median_rate"], 4
        ),
        "ratio_cache_off_per_round": [
            round(w["rate"] / b["rate"], 4)
            for w, b in zip(runs["worker cache off"], runs["baseline"], strict=True)
        ],
    }


# --- 2. latency under load -----------------------------------------------------------------------


def _split(received: dict[bytes, Received]) -> dict[str, list[float]]:
    """Per message: end to end (created_at, set by the bench's producer -> receipt by the bench's
    consumer), and its parts: `batch_wait` and `model` (the verdict's headers), `worker` (the
    rest of consume -> verdict ready: decoding, queueing in order behind earlier messages of the
    partition, parsing), `inbound` (Kafka and the worker's consumer until it handles the
    message) and `outbound` (verdict ready -> the bench has it: produce, acknowledgement,
    Kafka, the bench's consumer). `overhead` is all but the batch wait and the model: what the
    pipeline adds. The worker's own clock stamps `produced_at`."""
    parts: dict[str, list[float]] = {k: [] for k in PARTS}
    for rec in received.values():
        event = rec.event()
        created = created_at(event)
        if created is None:
            continue
        produced = datetime.fromisoformat(str(event["produced_at"])).timestamp()
        e2e = (rec.at - created) * 1000
        worker = float(event.get("latency_ms", 0.0))
        wait = float(rec.headers.get("guardstream-batch-wait-ms", b"0") or 0)
        model = float(rec.headers.get("guardstream-generate-ms", b"0") or 0)
        parts["e2e"].append(e2e)
        parts["batch_wait"].append(wait)
        parts["model"].append(model)
        parts["worker"].append(max(worker - wait - model, 0.0))
        parts["inbound"].append(max((produced - created) * 1000 - worker, 0.0))
        parts["outbound"].append(max((rec.at - produced) * 1000, 0.0))
        parts["overhead"].append(e2e - wait - model)
    return parts


def _latency_row(parts: dict[str, list[float]]) -> dict[str, Any]:
    e2e = parts["e2e"]
    return {
        "samples": len(e2e),
        "p50_ms": round(percentile(e2e, 50), 1),
        "p95_ms": round(percentile(e2e, 95), 1),
        "p99_ms": round(percentile(e2e, 99), 1),
        "mean_ms": {k: round(mean(v), 1) for k, v in parts.items()},
        "p99_part_ms": {k: round(percentile(v, 99), 1) for k, v in parts.items()},
    }


def _stream(prompts: Sequence[str], count: int, run: str) -> list[Message]:
    return unique_stream(prompts, count, run)


def _model_settings(plan: Plan, **over: Any) -> dict[str, Any]:
    return {
        "cache_enabled": False,
        "batch_max_size": plan.batch_size,
        "batch_max_wait_ms": plan.max_wait_ms,
        "batch_max_in_flight": plan.in_flight,
        **plan.model_settings,
        **over,
    }


def _capacity(
    env: Env,
    plan: Plan,
    target: Target,
    prompts: Sequence[str],
    slots: int,
    seconds: float,
    label: str,
) -> float:
    """Saturation throughput, keeping twice what the batches in flight hold outstanding."""
    run = f"c{_stamp()}"
    need = int(20_000 + 3000 * (seconds + plan.settle_seconds))
    sat = run_capacity(
        env,
        target,
        _warm(prompts, plan.warmup, f"w{run}"),
        _stream(prompts, need, run),
        backlog=max(200, 2 * slots),
        seconds=seconds,
        settle=plan.settle_seconds,
        label=label,
    )
    return sat.rate


def _paced(
    env: Env,
    plan: Plan,
    target: Target,
    prompts: Sequence[str],
    rate: float,
    seconds: float,
    label: str,
) -> dict[str, Any]:
    assert target.worker is not None
    count = max(100, int(rate * seconds))
    run = f"l{_stamp()}"
    before = target.worker.model_calls()
    timed = run_messages(
        env,
        target,
        [],
        _stream(prompts, count, run),
        rate=rate,
        label=label,
        keep_values=True,
        timeout=seconds * 3 + 60,
    )
    time.sleep(0.5)
    after = target.worker.model_calls()
    calls = after["calls"] - before["calls"]
    row = _latency_row(_split(timed.received))
    first, last = _early_late(timed)
    row.update(
        offered_rate=round(rate, 1),
        achieved_rate=round(timed.count / max(timed.elapsed, 1e-9), 1),
        complete=timed.complete,
        model_calls=calls,
        mean_batch=round((after["inputs"] - before["inputs"]) / calls, 2) if calls else 0.0,
        p50_first_quarter_ms=round(first, 1),
        p50_last_quarter_ms=round(last, 1),
        keeps_up=timed.complete and last <= 1.5 * first + 100,
    )
    return row


def _early_late(timed: Timed) -> tuple[float, float]:
    """Median end-to-end latency (ms) of the first and of the last quarter of the messages, in
    the order they were sent: a system that keeps up has the same at both ends; one that falls
    behind builds a backlog, and its late messages wait longer and longer."""
    order = sorted(timed.received, key=lambda k: timed.sent[k])
    e2e = [(timed.received[k].at - timed.sent[k]) * 1000 for k in order]
    quarter = max(1, len(e2e) // 4)
    return median(e2e[:quarter]), median(e2e[-quarter:])


def _sustainable(
    env: Env, plan: Plan, target: Target, prompts: Sequence[str], ceiling: float, say: Say
) -> tuple[float, list[dict[str, Any]]]:
    """The highest offered rate (open loop, messages at a steady pace) the worker keeps up with,
    probing upward from `plan.probe_start` x `ceiling` (the closed-loop capacity) by
    `plan.probe_step`. A closed loop hands the worker its input in bursts, which it handles more
    cheaply per message than a steady trickle, so its capacity overstates what a steady stream
    can be offered."""
    probes: list[dict[str, Any]] = []
    rate = ceiling * plan.probe_start
    best = 0.0
    while rate <= ceiling * 1.001:
        row = _paced(env, plan, target, prompts, rate, plan.probe_seconds, f"probe {rate:.0f}/s")
        probes.append(
            {
                k: row[k]
                for k in (
                    "offered_rate",
                    "keeps_up",
                    "p50_first_quarter_ms",
                    "p50_last_quarter_ms",
                    "p99_ms",
                )
            }
        )
        say(f"  probe {rate:.0f} msg/s: {'keeps up' if row['keeps_up'] else 'falls behind'}")
        if not row["keeps_up"]:
            break
        best = rate
        rate *= plan.probe_step
    if best == 0.0:  # not even the first step: take half of it
        best = ceiling * plan.probe_start / 2
    return best, probes


def latency(env: Env, plan: Plan, prompts: Sequence[str], say: Say) -> dict[str, Any]:
    """Capacity with the model stand-in (closed loop, then the highest steady rate the worker
    keeps up with), then open-loop offered load at fractions of it."""
    settings = _model_settings(plan)
    rows = []
    with worker_target(env, settings, plan.model_env) as target:
        slots = plan.batch_size * plan.in_flight
        closed = _capacity(
            env, plan, target, prompts, slots, plan.capacity_seconds, "latency: capacity"
        )
        say(f"  closed-loop capacity {closed:.0f} msg/s")
        capacity, probes = _sustainable(env, plan, target, prompts, closed, say)
        say(f"  sustainable capacity {capacity:.0f} msg/s")
        for load in plan.loads:
            rate = load * capacity
            label = f"latency: {load:.0%} load"
            row = _paced(env, plan, target, prompts, rate, plan.load_seconds, label)
            row["load"] = load
            if plan.cost_ms is not None:
                cost = plan.cost_ms(plan.batch_size)
                row["budget_ms"] = round(plan.max_wait_ms + cost + 50, 1)
                row["within_budget"] = row["p99_ms"] <= row["budget_ms"]
            rows.append(row)
            say(
                f"  {load:.0%} load ({rate:.0f} msg/s): p50 {row['p50_ms']} p95 {row['p95_ms']} "
                f"p99 {row['p99_ms']} ms, mean batch {row['mean_batch']}"
            )
    return {
        "settings": settings,
        "closed_loop_capacity": round(closed, 1),
        "capacity": round(capacity, 1),
        "probes": probes,
        "rows": rows,
    }


# --- 3. batching ---------------------------------------------------------------------------------


def batching(
    env: Env, plan: Plan, prompts: Sequence[str], say: Say, reference_rate: float | None
) -> dict[str, Any]:
    """Throughput and p99 latency against max_batch_size, max_wait_ms and max_in_flight, each
    varied alone from the default configuration. p99 is taken at one fixed offered rate for
    every configuration (half the default configuration's capacity), so the configurations that
    cannot carry it show up as overloaded: the knee."""
    default = (plan.batch_size, plan.max_wait_ms, plan.in_flight)
    configs = [default]
    configs += [(size, plan.max_wait_ms, plan.in_flight) for size in plan.sweep_sizes]
    configs += [(plan.batch_size, wait, plan.in_flight) for wait in plan.sweep_waits]
    configs += [(plan.batch_size, plan.max_wait_ms, k) for k in plan.sweep_in_flight]
    configs = list(dict.fromkeys(configs))  # the default first, each configuration once
    rows = []
    rate = reference_rate
    for size, wait, k in configs:
        settings = _model_settings(
            plan, batch_max_size=size, batch_max_wait_ms=wait, batch_max_in_flight=k
        )
        label = f"batching size={size} wait={wait:g}ms in_flight={k}"
        with worker_target(env, settings, plan.model_env) as target:
            capacity = _capacity(
                env, plan, target, prompts, size * k, plan.sweep_seconds, f"{label}: capacity"
            )
            if rate is None:  # no latency scenario ran: half the default's sustainable rate
                sustainable, _ = _sustainable(env, plan, target, prompts, capacity, say)
                rate = sustainable / 2
            row: dict[str, Any] = {
                "max_batch_size": size,
                "max_wait_ms": wait,
                "max_in_flight": k,
                "capacity": round(capacity, 1),
                "offered_rate": round(rate, 1),
            }
            if capacity < rate:
                row.update(overloaded=True, p50_ms=None, p95_ms=None, p99_ms=None)
            else:
                lat = _paced(
                    env, plan, target, prompts, rate, plan.sweep_seconds, f"{label}: {rate:.0f}/s"
                )
                row.update(overloaded=not lat["keeps_up"], **lat)
        rows.append(row)
        p99 = "overloaded" if row["overloaded"] else f"p99 {row['p99_ms']} ms"
        say(f"  {label}: {capacity:.0f} msg/s, {p99}")
    return {
        "offered_rate": round(rate or 0.0, 1),
        "default": {
            "max_batch_size": default[0],
            "max_wait_ms": default[1],
            "max_in_flight": default[2],
        },
        "rows": rows,
    }


# --- 4. cache and dedupe -------------------------------------------------------------------------


def _cache_backlog(batch_size: int, in_flight: int, repeat_fraction: float) -> int:
    """Messages the closed loop keeps outstanding: enough that the misses among them could fill
    every batch the model may run four times over. A hit is published in offset order, behind
    the misses read before it on its partition, so it holds its place in the window about as
    long as a miss does; with a window sized for misses alone, too few misses arrive between two
    model calls to fill a batch, and the gain hides (a producer with a real backlog, where the
    worker reads ahead, is not capped like that)."""
    misses = 4 * batch_size * in_flight
    return max(200, math.ceil(misses / max(1.0 - repeat_fraction, 0.05)))


def cache(env: Env, plan: Plan, prompts: Sequence[str], say: Say) -> dict[str, Any]:
    """Streams where a fraction of messages repeat texts of a small hot set (greetings, spam),
    with the cache on and off: model calls avoided (cache hits, in-batch dedupes) and the
    throughput at saturation. The model is given `cache_in_flight` batches at a time, so that it
    is the bottleneck (as a GPU is in production, not the worker's CPU): a call avoided is
    throughput gained."""
    rows = []
    in_flight = plan.cache_in_flight
    for cache_on in plan.cache_modes:
        for fraction in plan.repeat_fractions:
            settings = _model_settings(plan, cache_enabled=cache_on, batch_max_in_flight=in_flight)
            label = f"cache {'on' if cache_on else 'off'}, {fraction:.0%} repeats"
            run = f"r{_stamp()}"
            need = int(20_000 + 3000 * (plan.sweep_seconds + plan.settle_seconds))
            with worker_target(env, settings, plan.model_env) as target:
                assert target.worker is not None
                warm = _warm(prompts, plan.warmup, f"w{run}")
                messages = repeat_stream(prompts, need, run, fraction)
                sat = run_capacity(
                    env,
                    target,
                    warm,
                    messages,
                    backlog=_cache_backlog(plan.batch_size, in_flight, fraction),
                    seconds=plan.sweep_seconds,
                    settle=plan.settle_seconds,
                    label=label,
                    keep_values=True,
                )
                time.sleep(0.5)
                calls = target.worker.model_calls()
            sent = len(sat.sent)
            generated = calls["inputs"] - len(warm)
            hits = sum(1 for r in sat.received.values() if b'"cached":true' in r.value)
            avoided = max(sent - generated, 0)
            row: dict[str, Any] = {
                "cache": cache_on,
                "repeat_fraction": fraction,
                "messages": sent,
                "drained": sat.drained,
                "model_inputs": generated,
                "model_calls_avoided": avoided,
                "avoided_fraction": round(avoided / sent, 4) if sent else 0.0,
                "cache_hits": hits,
                "deduped": max(avoided - hits, 0),
                "rate": round(sat.rate, 1),
            }
            rows.append(row)
            say(
                f"  {label}: {row['rate']:.0f} msg/s, {avoided} of {sent} model calls avoided "
                f"({hits} cache hits)"
            )
    no_repeats = {r["cache"]: r["rate"] for r in rows if r["repeat_fraction"] == 0}
    for row in rows:
        no_repeat_rate = no_repeats.get(row["cache"])
        row["throughput_gain"] = round(row["rate"] / no_repeat_rate, 3) if no_repeat_rate else None
    return {"settings": _model_settings(plan, batch_max_in_flight=in_flight), "rows": rows}
