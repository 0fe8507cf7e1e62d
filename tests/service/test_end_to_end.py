"""End to end: the shared benchmarks through Kafka and the worker; F1 from the verdict events
equals what `engine.evaluation` gives for the same files, with exactly one verdict per input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.backends.replay import ReplayBackend
from engine.evaluation import BENCHMARKS, backend_generate, evaluate, load_prediction_samples, score
from engine.prompt import split_model_input
from tests.service.conftest import replay_folder
from tests.service.harness import consume, produce, running_worker, values

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPT_SETS = ["SimpleSafetyTests", "AegisSafetyTest", "HarmBenchPrompt"]
RESPONSE_SETS = ["HarmBenchResponse", "XSTestReponseHarmful"]
# The two XSTest files record different outputs for the same inputs: never in one replay folder.
PHASES = {
    "prompts+responses": PROMPT_SETS + RESPONSE_SETS,
    "refusal": ["XSTestResponseRefusal"],
}


@pytest.mark.parametrize("phase", list(PHASES))
async def test_stream_f1_equals_evaluate(
    phase: str,
    tmp_path: Path,
    shared_dir: Path,
    base_env: dict[str, str],
    kafka_bootstrap: str,
) -> None:
    names = PHASES[phase]
    folder = replay_folder(tmp_path, shared_dir, "1B", names)
    benchmarks = {b.name: b for b in BENCHMARKS}
    env = {
        **base_env,
        "GUARDSTREAM_REPLAY_PATH": str(folder),
        "GUARDSTREAM_MAX_NEW_TOKENS": "4096",
        "GUARDSTREAM_CACHE_ENABLED": "false",
        "GUARDSTREAM_BATCH_MAX_SIZE": "64",
    }
    prompts: list[tuple[bytes, bytes]] = []
    responses: list[tuple[bytes, bytes]] = []
    expected_f1: dict[str, float] = {}
    gold: dict[str, dict[str, str]] = {}
    backend = ReplayBackend(folder)
    await backend.start()
    for name in names:
        bench = benchmarks[name]
        samples = load_prediction_samples(folder / f"{name}.jsonl", bench)
        generate = backend_generate(backend, 4096)
        # as the worker does by default: prompt-only requests stop at Task 2 (early exit)
        result = await evaluate(bench, samples, generate, rule="project", early_exit=True)
        expected_f1[name] = result.score.f1
        gold[name] = {}
        for i, sample in enumerate(samples):
            prompt, response = split_model_input(sample.model_input)
            sid = f"{name}-{i}"
            gold[name][sid] = sample.gold
            conv = f"{name}-{i % 37}"
            body = {"id": sid, "conversation_id": conv}
            if response is None:
                prompts.append((conv.encode(), json.dumps({**body, "text": prompt}).encode()))
            else:
                event = {**body, "reply_to": f"p-{sid}", "text": response, "prompt": prompt}
                responses.append((conv.encode(), json.dumps(event).encode()))
    total = len(prompts) + len(responses)

    with running_worker(env, tmp_path / "worker.log") as worker:
        if prompts:
            await produce(kafka_bootstrap, env["GUARDSTREAM_TOPIC_PROMPTS"], prompts)
        if responses:
            await produce(kafka_bootstrap, env["GUARDSTREAM_TOPIC_RESPONSES"], responses)
        events = values(
            await consume(kafka_bootstrap, env["GUARDSTREAM_TOPIC_VERDICTS"], total, timeout=180)
        )
        assert worker.ready(), worker.log_tail()

    ids = [e["source_id"] for e in events]
    assert len(ids) == total, f"{len(ids)} verdicts for {total} inputs"
    assert len(set(ids)) == total, "exactly one verdict per input"
    by_id = {e["source_id"]: e for e in events}
    for name in names:
        task = benchmarks[name].task
        sids = list(gold[name])
        predicted = [by_id[s]["verdict"][task] for s in sids]
        got = score([gold[name][s] for s in sids], predicted, task, "honest")
        assert got.f1 == pytest.approx(expected_f1[name], abs=1e-9), name
    # The flagged topic holds exactly the flagged verdicts.
    flagged = [e["source_id"] for e in events if e["flagged"]]
    on_topic = values(
        await consume(kafka_bootstrap, env["GUARDSTREAM_TOPIC_FLAGGED"], len(flagged), timeout=30)
    )
    assert sorted(e["source_id"] for e in on_topic) == sorted(flagged)
