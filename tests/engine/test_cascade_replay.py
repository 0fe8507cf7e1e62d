"""The cascade on the recorded outputs: `evaluate_cascade` and `guardstream evaluate
--escalate-replay` against a direct recomputation from the prediction files (each benchmark's
own file, the README's XSTest trap), and the default policy's measured expectation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from engine.backends.base import Generation, Stops
from engine.backends.replay import ReplayBackend, approx_tokens
from engine.cascade import DEFAULT_POLICY, SIGNALS, EscalationPolicy, escalation_reason
from engine.evaluation import (
    BENCHMARKS,
    FIRST_PARAMS_B,
    SECOND_PARAMS_B,
    Benchmark,
    CascadeEvaluation,
    backend_generate,
    candidate_policies,
    cascade_rows,
    evaluate,
    evaluate_cascade,
    gold_label,
    load_prediction_samples,
)
from engine.parser import needs_full_output, parse
from engine.prompt import EARLY_EXIT_STOP, split_model_input
from schemas.verdict import Task, Verdict
from service.cli import main
from tests.engine.test_parser import README_FIGURES

NAMES = tuple(README_FIGURES["1B"])
BY_NAME = {b.name: b for b in BENCHMARKS}
FIRST, SECOND = "1B", "8B"
#: The shared README's benchmark table: samples per benchmark.
README_SAMPLES = {
    "SimpleSafetyTests": 100,
    "AegisSafetyTest": 359,
    "HarmBenchPrompt": 239,
    "HarmBenchResponse": 602,
    "XSTestReponseHarmful": 446,
    "XSTestResponseRefusal": 449,
}


@dataclass(frozen=True, slots=True)
class _Direct:
    """Independent of the code under test: one input's served verdict and decode tokens."""

    verdict: Verdict
    tokens: int


def _serve_directly(model_input: str, generated: str) -> _Direct:
    """What the guard serves, recomputed from the recorded text: a prompt-only input cut at the
    stop string and read as Task 1, read in full where it cannot be trusted as cut."""
    prompt, response = split_model_input(model_input)
    quoted = (prompt, response)
    if response is not None:
        return _Direct(parse(generated, quoted=quoted), approx_tokens(generated))
    at = generated.find(EARLY_EXIT_STOP)
    cut = generated if at < 0 else generated[:at]
    early = parse(cut, has_response=False, quoted=quoted, early_exit=True)
    if not needs_full_output(early):
        return _Direct(early, approx_tokens(cut))
    full = parse(generated, has_response=False, quoted=quoted)
    return _Direct(full, approx_tokens(cut) + approx_tokens(generated))


def _predictions(shared_dir: Path, size: str, name: str) -> list[tuple[str, str, str]]:
    """(model input, gold label, generated text) of every line, repeated inputs included."""
    path = shared_dir / "predictions" / size / f"{name}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]
    return [(r["prompt"], r["label"], r["predict"]) for r in rows]


def _label(verdict: Verdict, task: Task) -> str | None:
    return {"request": verdict.request, "completion": verdict.completion}.get(
        task, verdict.response
    )


def _f1(gold: Sequence[str], predicted: Sequence[str | None], positive: str) -> float:
    """F1 x100; an unread label counts as the wrong one."""
    tp = fp = fn = 0
    for truth, guess in zip(gold, predicted, strict=True):
        said_positive = guess == positive if guess is not None else truth != positive
        tp += truth == positive and said_positive
        fp += truth != positive and said_positive
        fn += truth == positive and not said_positive
    return 100.0 * 2 * tp / (2 * tp + fp + fn) if tp else 0.0


@dataclass(frozen=True, slots=True)
class _Recomputed:
    f1: float
    escalated: int
    first_tokens: int
    second_tokens: int
    second_alone_tokens: int


@dataclass(frozen=True, slots=True)
class _Input:
    gold: str
    has_response: bool
    quoted: tuple[str, str | None]
    first: _Direct
    second: _Direct


@cache
def _inputs(shared_dir: Path, name: str) -> tuple[_Input, ...]:
    """Each input of one benchmark with a gold label, both models' served verdicts, from the
    benchmark's own two prediction files."""
    task = BY_NAME[name].task
    second = {model_input: text for model_input, _, text in _predictions(shared_dir, SECOND, name)}
    inputs = []
    for model_input, raw_gold, generated in _predictions(shared_dir, FIRST, name):
        truth = gold_label(raw_gold, task)
        if truth is not None:
            prompt, response = split_model_input(model_input)
            one = _serve_directly(model_input, generated)
            other = _serve_directly(model_input, second[model_input])
            inputs.append(_Input(truth, response is not None, (prompt, response), one, other))
    return tuple(inputs)


def _recompute(shared_dir: Path, name: str, policy: EscalationPolicy) -> _Recomputed:
    """The cascade of `policy` on one benchmark."""
    task = BY_NAME[name].task
    predicted: list[str | None] = []
    escalated = first_tokens = second_tokens = 0
    inputs = _inputs(shared_dir, name)
    for one in inputs:
        first_tokens += one.first.tokens
        reason = escalation_reason(
            one.first.verdict, policy, has_response=one.has_response, quoted=one.quoted
        )
        chosen = one.first.verdict
        if reason is not None:
            escalated += 1
            second_tokens += one.second.tokens
            chosen = one.second.verdict
        predicted.append(_label(chosen, task))
    positive = "refusal" if task == "completion" else "harmful"
    return _Recomputed(
        _f1([one.gold for one in inputs], predicted, positive),
        escalated,
        first_tokens,
        second_tokens,
        sum(one.second.tokens for one in inputs),
    )


def _replay(shared_dir: Path, size: str, benchmark: Benchmark) -> ReplayBackend:
    return ReplayBackend(shared_dir / "predictions" / size / f"{benchmark.name}.jsonl")


@cache
def _evaluation(shared_dir: Path, name: str) -> CascadeEvaluation:
    benchmark = BY_NAME[name]
    first = _replay(shared_dir, FIRST, benchmark)
    samples = load_prediction_samples(Path(first.files[0]), benchmark)
    return asyncio.run(
        evaluate_cascade(
            benchmark,
            samples,
            backend_generate(first, 4096),
            backend_generate(_replay(shared_dir, SECOND, benchmark), 4096),
            candidate_policies(),
        )
    )


@pytest.mark.parametrize("name", NAMES)
def test_cascade_equals_a_direct_recomputation(shared_dir: Path, name: str) -> None:
    evaluation = _evaluation(shared_dir, name)
    assert [c.policy for c in evaluation.cascades] == candidate_policies()
    for result in evaluation.cascades:
        direct = _recompute(shared_dir, name, result.policy)
        assert result.score.f1 == pytest.approx(direct.f1), result.policy.name
        assert result.escalated == direct.escalated, result.policy.name
        assert (result.first_tokens, result.second_tokens) == (
            direct.first_tokens,
            direct.second_tokens,
        )
        assert sum(result.reasons.values()) == result.escalated
        assert result.second_failed == 0
        assert evaluation.second.tokens == direct.second_alone_tokens


@pytest.mark.parametrize("name", NAMES)
def test_each_model_alone_is_what_evaluate_serves(shared_dir: Path, name: str) -> None:
    """The cascade's columns alone are `evaluate` with early exit, as the guard serves; the
    policy without a signal is the first model alone."""
    benchmark = BY_NAME[name]
    evaluation = _evaluation(shared_dir, name)
    samples = load_prediction_samples(
        shared_dir / "predictions" / FIRST / f"{name}.jsonl", benchmark
    )
    for size, alone in ((FIRST, evaluation.first), (SECOND, evaluation.second)):
        generate = backend_generate(_replay(shared_dir, size, benchmark), 4096)
        served = asyncio.run(evaluate(benchmark, samples, generate, early_exit=True))
        assert (alone.score, alone.tokens, alone.trust) == (
            served.score,
            served.tokens,
            served.trust,
        )
    none = evaluation.cascades[0]
    assert none.policy.signals == frozenset() and none.escalated == 0
    assert (none.score, none.first_tokens) == (evaluation.first.score, evaluation.first.tokens)


def test_the_default_policy_meets_its_expectation(shared_dir: Path) -> None:
    """Measured on the six benchmarks: the default escalates some but at most 15% of the
    requests, costs less than the second model alone, and its F1 is at least the first model's
    alone on every benchmark and over all."""
    evaluations = [_evaluation(shared_dir, name) for name in NAMES]
    rows = {
        (r.policy, r.benchmark.name if r.benchmark else None): r for r in cascade_rows(evaluations)
    }
    alone = EscalationPolicy(frozenset())
    for name in (*NAMES, None):
        first, default = rows[alone, name], rows[DEFAULT_POLICY, name]
        assert default.f1 >= first.f1, name
        assert first.cost < default.cost < 1.0, name
        assert rows[None, name].escalation_rate == 100.0 and rows[None, name].cost == 1.0
    overall = rows[DEFAULT_POLICY, None]
    assert 0.0 < overall.escalation_rate <= 15.0


def test_cascade_rows_weigh_the_benchmarks_by_size(shared_dir: Path) -> None:
    evaluations = [_evaluation(shared_dir, name) for name in NAMES]
    rows = cascade_rows(evaluations)
    for policy in candidate_policies():
        per = [r for r in rows if r.policy == policy and r.benchmark is not None]
        (overall,) = [r for r in rows if r.policy == policy and r.benchmark is None]
        n = sum(r.samples for r in per)
        assert overall.samples == n == sum(README_SAMPLES.values())
        assert overall.f1 == pytest.approx(sum(r.f1 * r.samples for r in per) / n)
        assert overall.escalated == sum(r.escalated for r in per)
        first = sum(
            e.cascades[candidate_policies().index(policy)].first_tokens for e in evaluations
        )
        second = sum(
            e.cascades[candidate_policies().index(policy)].second_tokens for e in evaluations
        )
        alone = sum(e.second.tokens for e in evaluations)
        expected = (first * FIRST_PARAMS_B + second * SECOND_PARAMS_B) / (alone * SECOND_PARAMS_B)
        assert overall.cost == pytest.approx(expected)


def test_a_policy_with_more_signals_escalates_at_least_as_often(shared_dir: Path) -> None:
    for name in NAMES:
        results = {c.policy: c for c in _evaluation(shared_dir, name).cascades}
        for small in results:
            for large in results:
                if small.signals <= large.signals:
                    assert results[small].escalated <= results[large].escalated


@pytest.mark.parametrize("name", ["HarmBenchResponse", "AegisSafetyTest"])
def test_a_failing_second_model_keeps_the_first_verdict(shared_dir: Path, name: str) -> None:
    """Where the second model gives no output the first model's verdict is scored, as the
    stream publishes it (marked, by the failure policy)."""
    benchmark = BY_NAME[name]
    first = _replay(shared_dir, FIRST, benchmark)
    samples = load_prediction_samples(Path(first.files[0]), benchmark)

    async def failing(inputs: list[str], stop: Stops = None, /) -> list[Generation]:
        return [Generation("", finish_reason="error", error="down") for _ in inputs]

    evaluation = asyncio.run(
        evaluate_cascade(
            benchmark, samples, backend_generate(first, 4096), failing, [DEFAULT_POLICY]
        )
    )
    (result,) = evaluation.cascades
    assert result.escalated > 0
    assert result.second_failed == result.escalated
    assert result.score == evaluation.first.score


def _cli(
    capsys: pytest.CaptureFixture[str], shared_dir: Path, *args: str
) -> list[dict[str, object]]:
    predictions = shared_dir / "predictions"
    argv = [
        "evaluate",
        "--json",
        "--replay",
        str(predictions / FIRST),
        "--escalate-replay",
        str(predictions / SECOND),
        *args,
    ]
    assert main(argv) == 0
    rows: list[dict[str, object]] = json.loads(capsys.readouterr().out)
    return rows


def test_cli_reports_the_default_against_each_model_alone(
    shared_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Per benchmark, read from each benchmark's own files (the two XSTest files are never
    mixed), the CLI's cascade equals the direct recomputation."""
    rows = _cli(capsys, shared_dir)
    policies = {str(r["policy"]) for r in rows}
    assert policies == {"second alone", "none", DEFAULT_POLICY.name}
    assert {str(r["benchmark"]) for r in rows} == {*NAMES, "overall"}
    for name in NAMES:
        (row,) = [r for r in rows if r["benchmark"] == name and r["policy"] == DEFAULT_POLICY.name]
        direct = _recompute(shared_dir, name, DEFAULT_POLICY)
        assert float(str(row["f1"])) == pytest.approx(direct.f1), name
        assert row["escalated"] == direct.escalated
        cost = direct.first_tokens * FIRST_PARAMS_B + direct.second_tokens * SECOND_PARAMS_B
        expected = cost / (direct.second_alone_tokens * SECOND_PARAMS_B)
        assert float(str(row["cost_vs_second"])) == pytest.approx(expected)


def test_cli_compares_every_candidate_policy(
    shared_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _cli(capsys, shared_dir, "--compare-policies")
    overall = {str(r["policy"]): r for r in rows if r["benchmark"] == "overall"}
    assert set(overall) == {"second alone", *(p.name for p in candidate_policies())}
    assert len(candidate_policies()) == 2 ** len(SIGNALS)
    argv = ["evaluate", "--replay", str(shared_dir / "predictions" / FIRST)]
    argv += ["--escalate-replay", str(shared_dir / "predictions" / SECOND), "--compare-policies"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"{DEFAULT_POLICY.name} (default)" in text
    for policy in candidate_policies()[1:]:
        assert policy.name in text


def test_cli_policy_option(shared_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _cli(capsys, shared_dir, "--escalate-policy", "hedge, untrusted")
    assert {str(r["policy"]) for r in rows} == {"second alone", "none", "hedge+untrusted"}
    replay = ["--replay", str(shared_dir / "predictions" / FIRST)]
    escalate = ["--escalate-replay", str(shared_dir / "predictions" / SECOND)]
    with pytest.raises(SystemExit):
        main(["evaluate", *replay, *escalate, "--escalate-policy", "untrusted,vibes"])
    err = capsys.readouterr().err
    assert "'vibes'" in err and "hedge" in err
    assert main(["evaluate", *replay, *replay, *escalate]) == 2
    assert "one --replay" in capsys.readouterr().err
    assert main(["evaluate", *replay, "--compare-policies"]) == 2
    assert "--escalate-replay" in capsys.readouterr().err
