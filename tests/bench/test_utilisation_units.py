"""The utilisation scenario's parts that need no broker: the workload, the admission modes, the
engine-alone figures, the goals, the table and the worker's simulated engine."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from bench import report_utilisation
from bench.sim_engine import SimulatedInflightBackend, preset_named
from bench.utilisation import (
    Mode,
    UtilisationPlan,
    _level_figures,
    engine_capacity,
    engine_levels,
    goals,
    parse_modes,
)
from bench.worker import make_backend
from bench.workload import (
    RESPONSE_GAP_S,
    Event,
    Workload,
    conversation_pairs,
    levels_schedule,
)
from engine.prompt import EARLY_EXIT_STOP, build_model_input
from service.config import Settings

PAIRS = [(f"prompt {i}", f"response {i}") for i in range(50)]


def test_pairs_mix_sends_each_response_after_its_prompt_and_never_repeats_a_text() -> None:
    work = Workload(PAIRS, "pairs", "r")
    events = levels_schedule(work, [20.0, 40.0], 10.0, seed=3)
    assert [e.at for e in events] == sorted(e.at for e in events)
    prompts = {e.id: e for e in events if not e.is_response}
    responses = [e for e in events if e.is_response]
    assert responses and len(responses) <= len(prompts)
    for r in responses:
        p = prompts[r.reply_to or ""]
        assert r.conversation == p.conversation and r.prompt == p.text
        assert r.at == pytest.approx(p.at + RESPONSE_GAP_S)
    texts = [e.text for e in prompts.values()]
    assert len(set(texts)) == len(texts) > len(PAIRS)  # past the pairs: suffixed, still unique
    # about the rates asked, per level
    for level, rate in ((0, 20.0), (1, 40.0)):
        n = sum(1 for e in events if e.level == level)
        assert 0.6 * rate * 10 < n < 1.4 * rate * 10
    # the same seed, the same schedule
    again = levels_schedule(Workload(PAIRS, "pairs", "r"), [20.0, 40.0], 10.0, seed=3)
    assert [(e.at, e.id, e.text) for e in again] == [(e.at, e.id, e.text) for e in events]


def test_each_event_knows_the_model_input_and_stop_the_guard_builds() -> None:
    p = Event(1.0, "i", "c", "hello", 0)
    r = Event(2.0, "j", "c", "hi there", 0, prompt="hello", reply_to="i")
    assert p.arrival(max_chars=32_000, early_exit=True).stop == EARLY_EXIT_STOP
    assert p.arrival(max_chars=32_000, early_exit=False).stop is None
    assert p.arrival(max_chars=32_000, early_exit=True).model_input == build_model_input(
        "hello", None
    )
    got = r.arrival(max_chars=32_000, early_exit=True)
    assert got.stop is None and got.at == 2.0
    assert got.model_input == build_model_input("hello", "hi there")
    body = json.loads(r.value())
    assert body["reply_to"] == "i" and body["conversation_id"] == "c" and "prompt" not in body
    assert "reply_to" not in json.loads(p.value())


def test_prompts_mix_is_prompt_only() -> None:
    events = Workload(PAIRS, "prompts", "q").poisson(
        30.0, 5.0, start=0.0, level=0, rng=random.Random(1)
    )
    assert events and not any(e.is_response for e in events)


def test_conversation_pairs_come_from_the_benchmarks_with_a_response(shared_dir: Path) -> None:
    pairs = conversation_pairs(shared_dir)
    assert len(pairs) > 1000
    assert len({p for p, _ in pairs}) == len(pairs)
    assert all(r.strip() and r != "None" for _, r in pairs)


def test_modes_parse_and_name_their_settings() -> None:
    engine = preset_named("8B-H100")
    modes = parse_modes("batch:32x2, batch:256x1,request,request:64", engine)
    assert modes == [
        Mode("batch", 32, 2),
        Mode("batch", 256, 1),
        Mode("request", sequences=256),
        Mode("request", sequences=64),
    ]
    assert [m.label for m in modes] == ["batch 32x2", "batch 256x1", "request 256", "request 64"]
    assert modes[0].settings() == {
        "admission": "batch",
        "batch_max_size": 32,
        "batch_max_in_flight": 2,
    }
    assert modes[2].settings() == {"admission": "request", "engine_max_sequences": 256}
    for bad in ("batch:32", "inflight", "batch:ax2", ""):
        with pytest.raises(ValueError):
            parse_modes(bad, engine)


def test_level_figures_count_the_window_and_what_is_outstanding() -> None:
    events = [Event(float(i), f"e{i}", "c", "t", i // 10) for i in range(20)]
    # each answered 2 s after it was sent, but e19 never
    times = {e.id: (e.at, e.at + 2.0) for e in events if e.id != "e19"}
    guard = {k: 500.0 for k in times}
    first = _level_figures(events, times, 0, 10.0, 2.0, end_of_wait=30.0, guard_ms=guard)
    assert first["events"] == 10 and first["offered_rate"] == 1.0
    assert first["delivered_rate"] == 1.0  # in [2, 10): those sent at 0 to 7
    assert first["undelivered"] == 0 and first["outstanding_at_end"] == 2  # sent at 8 and 9
    assert first["p99_guard_ms"] == pytest.approx(500)
    assert first["p50_ms"] == pytest.approx(2000) and first["p99_ms"] == pytest.approx(2000)
    second = _level_figures(events, times, 1, 10.0, 2.0, end_of_wait=30.0)
    assert second["undelivered"] == 1 and second["delivered_rate"] == 1.0  # 8 in [12, 20)
    assert "p99_guard_ms" not in second  # the engine alone has no such split
    assert second["p99_ms"] > 10_000  # e19 counts as waiting until the end of the wait


def _plan(**over: Any) -> UtilisationPlan:
    plan: dict[str, Any] = {
        "preset": "8B-H100",
        "mix": "pairs",
        "modes": "request",
        "loads": [0.5, 1.2],
        "level_seconds": 20.0,
        "settle_seconds": 5.0,
        "drain_seconds": 30.0,
        "max_new_tokens": 2048,
        "max_text_chars": 32_000,
        "early_exit": True,
        "capacity_sample": 600,
        "seed": 5,
        "warmup_turns": 1,
        "outputs_root": Path("."),
        **over,
    }
    return UtilisationPlan(**plan)


def test_the_engine_alone_keeps_up_below_its_capacity_and_not_above(shared_dir: Path) -> None:
    from bench.data import recorded_outputs

    engine = preset_named("8B-H100")
    outputs = recorded_outputs(shared_dir / "predictions" / "8B")
    plan = _plan()
    pairs = conversation_pairs(shared_dir)
    sample = Workload(pairs, "pairs", "cap").at_once(plan.capacity_sample)
    capacity, run = engine_capacity(engine, outputs, plan, sample)
    assert 30 < capacity < 70 and run["max_running"] == engine.max_sequences
    work = Workload(pairs, "pairs", "u")
    events = levels_schedule(work, [0.5 * capacity, 1.2 * capacity], 20.0, seed=5)
    half, over = engine_levels(engine, outputs, plan, events)
    assert half["undelivered"] == over["undelivered"] == 0  # the engine alone drains
    assert half["delivered_rate"] == pytest.approx(half["offered_rate"], rel=0.25)
    assert over["delivered_rate"] < over["offered_rate"]
    assert half["p50_ms"] <= half["p99_ms"] < over["p99_ms"]


def _results() -> dict[str, Any]:
    def row(load: float, rate: float, p99: float, engine_p99: float) -> dict[str, Any]:
        return {
            "load": load,
            "events": 100,
            "offered_rate": rate,
            "delivered_rate": rate,
            "ratio_capacity": rate / 40,
            "undelivered": 0,
            "outstanding_at_end": 9,
            "p50_ms": p99 / 2,
            "p99_ms": p99,
            "engine_p99_ms": engine_p99,
            "p99_ratio": p99 / engine_p99,
            "engine_mean_running": 50.0,
            "engine_done_rate": rate,
            "p99_guard_ms": engine_p99,
            "engine_lag_mean_ms": 0.5,
            "engine_lag_max_ms": 20.0,
            "worker_cpu": 0.2,
            "loadavg_1m": 1.5,
        }

    alone = [
        {k: v for k, v in row(x, 40 * x, 5000, 5000).items() if not k.startswith("engine_")}
        for x in (0.5, 1.2)
    ]
    modes = [
        {
            "mode": "request 256",
            "complete": True,
            "sent": 200,
            "delivered": 200,
            "rows": [row(0.5, 20, 5200, 5000), row(1.2, 38, 9000, 8000)],
        },
        {
            "mode": "batch 32x2",
            "complete": False,
            "sent": 200,
            "delivered": 150,
            "rows": [row(0.5, 10, 20_000, 5000), row(1.2, 10, 40_000, 8000)],
        },
    ]
    return {
        "preset": "8B-H100",
        "engine": "sim:GuardReasoner-8B@H100 SXM5",
        "max_sequences": 256,
        "mix": "pairs",
        "max_new_tokens": 2048,
        "capacity": 40.0,
        "capacity_run": {"sample": 600, "mean_decode_steps": 220.0},
        "loads": [0.5, 1.2],
        "level_seconds": 20.0,
        "settle_seconds": 5.0,
        "seed": 5,
        "engine_alone": alone,
        "modes": modes,
        "goals": goals(modes, [0.5, 1.2]),
    }


def test_goals_and_the_table_say_met_or_missed(tmp_path: Path) -> None:
    u = _results()
    assert u["goals"]["request 256"] == {
        "saturation_ratio": 0.95,
        "saturation_met": True,
        "p99_ratio_at_50": 1.04,
        "p99_met": True,
    }
    assert u["goals"]["batch 32x2"]["saturation_met"] is False
    assert u["goals"]["batch 32x2"]["p99_met"] is False
    text = report_utilisation.text(u)
    assert "preset 8B-H100" in text and "| mode " in text
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 2 + 4  # header, rule, engine alone, two modes
    assert lines[0].count("|") == 14
    assert "request 256: at 120% load it delivers 0.95" in text and "met" in text
    assert "batch 32x2: 50 of 200 verdicts still queued" in text
    path = report_utilisation.write_csv(u, tmp_path / "u.csv")
    rows = path.read_text().splitlines()
    assert rows[0].startswith("mode,load,") and len(rows) == 1 + 2 + 4


def test_the_worker_runs_the_simulated_engine_by_env(shared_dir: Path) -> None:
    outputs = str(shared_dir / "predictions" / "8B")
    env = {
        "GUARDSTREAM_BENCH_BACKEND": "sim_inflight",
        "GUARDSTREAM_BENCH_OUTPUTS": outputs,
        "GUARDSTREAM_BENCH_SIM_PRESET": "3B-H200",
    }
    settings = Settings(replay_path=outputs)
    backend = make_backend(settings, env)
    assert isinstance(backend, SimulatedInflightBackend)
    assert backend.engine == preset_named("3B-H200") and backend.batching == "inflight"
    with pytest.raises(SystemExit, match="GUARDSTREAM_BENCH_SIM_PRESET"):
        make_backend(settings, {**env, "GUARDSTREAM_BENCH_SIM_PRESET": "9B-A100"})
