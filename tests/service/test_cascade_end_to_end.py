"""End to end, a guard cascade: GuardReasoner-1B's recorded outputs answer, 8B's are asked where
the default escalation policy fires; through the local broker and a worker in the default
configuration otherwise (pairing on, early exit on). Stream F1 per benchmark equals
`evaluate_cascade`'s for the same files exactly, every escalation is in its event and counted
in the worker's metric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.backends.replay import ReplayBackend
from engine.cascade import DEFAULT_POLICY
from engine.evaluation import (
    BENCHMARKS,
    backend_generate,
    evaluate_cascade,
    load_prediction_samples,
    score,
)
from engine.prompt import split_model_input
from tests.service.conftest import replay_folder
from tests.service.harness import consume, produce, running_worker, values
from tests.service.test_observability import scrape

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A prompt benchmark and a response one (not both XSTest files: they record different outputs
# for the same inputs).
NAMES = ["AegisSafetyTest", "HarmBenchResponse"]
SECOND_MODEL = "yueliu1999/GuardReasoner-8B"


async def test_cascade_stream_f1_equals_evaluate_and_escalations_are_marked_and_counted(
    tmp_path: Path, shared_dir: Path, base_env: dict[str, str], kafka_bootstrap: str
) -> None:
    first = replay_folder(tmp_path, shared_dir, "1B", NAMES)
    second = replay_folder(tmp_path, shared_dir, "8B", NAMES)
    env = {
        **base_env,
        "GUARDSTREAM_REPLAY_PATH": str(first),
        "GUARDSTREAM_ESCALATE_ENGINE": "replay",
        "GUARDSTREAM_ESCALATE_MODEL": SECOND_MODEL,
        "GUARDSTREAM_ESCALATE_REPLAY_PATH": str(second),
        "GUARDSTREAM_MAX_NEW_TOKENS": "4096",
        "GUARDSTREAM_CACHE_ENABLED": "false",
    }
    benchmarks = {b.name: b for b in BENCHMARKS}
    first_backend, second_backend = ReplayBackend(first), ReplayBackend(second)
    expected_f1: dict[str, float] = {}
    expected_escalated: dict[str, int] = {}
    gold: dict[str, dict[str, str]] = {}
    prompts: list[tuple[bytes, bytes]] = []
    responses: list[tuple[bytes, bytes]] = []
    for name in NAMES:
        bench = benchmarks[name]
        samples = load_prediction_samples(first / f"{name}.jsonl", bench)
        result = await evaluate_cascade(
            bench,
            samples,
            backend_generate(first_backend, 4096),
            backend_generate(second_backend, 4096),
            (DEFAULT_POLICY,),
        )
        [cascade] = result.cascades
        expected_f1[name] = cascade.score.f1
        expected_escalated[name] = cascade.escalated
        gold[name] = {}
        for i, sample in enumerate(samples):
            prompt, response = split_model_input(sample.model_input)
            sid = f"{name}-{i}"
            gold[name][sid] = sample.gold
            conv = f"{name}-{i % 29}"
            body = {"id": sid, "conversation_id": conv}
            if response is None:
                prompts.append((conv.encode(), json.dumps({**body, "text": prompt}).encode()))
            else:
                event = {**body, "reply_to": f"p-{sid}", "text": response, "prompt": prompt}
                responses.append((conv.encode(), json.dumps(event).encode()))
    assert sum(expected_escalated.values()) > 0, "the data must exercise the second model"
    total = len(prompts) + len(responses)

    with running_worker(env, tmp_path / "worker.log") as worker:
        await produce(kafka_bootstrap, env["GUARDSTREAM_TOPIC_PROMPTS"], prompts)
        await produce(kafka_bootstrap, env["GUARDSTREAM_TOPIC_RESPONSES"], responses)
        events = values(
            await consume(kafka_bootstrap, env["GUARDSTREAM_TOPIC_VERDICTS"], total, timeout=180)
        )
        assert worker.ready(), worker.log_tail()
        _, scraped = scrape(worker)

    by_id = {e["source_id"]: e for e in events}
    assert len(by_id) == len(events) == total, "exactly one verdict per input"
    escalated_events = 0
    for name in NAMES:
        task = benchmarks[name].task
        sids = list(gold[name])
        predicted = [by_id[s]["verdict"][task] for s in sids]
        got = score([gold[name][s] for s in sids], predicted, task, "honest")
        assert got.f1 == pytest.approx(expected_f1[name], abs=1e-9), name
        marks = [by_id[s]["verdict"]["escalation"] for s in sids]
        assert all(m is not None for m in marks)
        up = [m for m in marks if m["escalated"]]
        assert len(up) == expected_escalated[name], name
        assert all(m["answered_by"] == SECOND_MODEL and m["first"] and m["reason"] for m in up)
        escalated_events += len(up)
    counted = sum(
        value
        for (metric_name, labels), value in scraped.items()
        if metric_name == "guardstream_escalations_total" and ("outcome", "answered") in labels
    )
    assert counted == escalated_events
