"""engine.evaluation and `guardstream evaluate` against the shared README's reference figures."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from engine.backends.base import Backend, Generation, Stops
from engine.evaluation import (
    BENCHMARKS,
    Sample,
    backend_generate,
    evaluate,
    load_benchmark_samples,
    load_prediction_samples,
    score,
)
from engine.prompt import EARLY_EXIT_STOP
from service.cli import main
from tests.engine.test_parser import README_FIGURES, SIZES

#: The shared README's benchmark table: samples per benchmark.
README_SAMPLES = {
    "SimpleSafetyTests": 100,
    "AegisSafetyTest": 359,
    "HarmBenchPrompt": 239,
    "HarmBenchResponse": 602,
    "XSTestReponseHarmful": 446,
    "XSTestResponseRefusal": 449,
}
BY_NAME = {b.name: b for b in BENCHMARKS}


def _cli_rows(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, dict[str, object]]:
    assert main(["evaluate", "--json", *args]) == 0
    out = capsys.readouterr().out
    return {row["benchmark"]: row for row in json.loads(out)}


@pytest.mark.parametrize("size", SIZES)
def test_cli_reference_rule_reproduces_the_readme(
    shared_dir: Path, capsys: pytest.CaptureFixture[str], size: str
) -> None:
    rows = _cli_rows(
        capsys, "--rule", "reference", "--replay", str(shared_dir / "predictions" / size)
    )
    assert set(rows) == set(README_FIGURES[size])
    for name, (f1, unparsed) in README_FIGURES[size].items():
        row = rows[name]
        assert (round(float(str(row["f1"])), 2), row["unparsed"]) == (f1, unparsed), name
        assert row["samples"] == README_SAMPLES[name]
        assert row["task"] == BY_NAME[name].table


def test_cli_reads_inputs_from_benchmark_files_alike(
    shared_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _cli_rows(
        capsys,
        "--rule",
        "reference",
        "--replay",
        str(shared_dir / "predictions" / "1B"),
        "--benchmarks",
        str(shared_dir / "benchmark"),
    )
    for name, (f1, unparsed) in README_FIGURES["1B"].items():
        assert (round(float(str(rows[name]["f1"])), 2), rows[name]["unparsed"]) == (f1, unparsed)


def _contradicted(shared_dir: Path, size: str, name: str) -> int:
    """Independent of the code under test: outputs whose final ``Answers`` block gives the
    scored task a label other than the first one the paper's pattern finds in the last 300
    characters."""
    task = BY_NAME[name].task
    labels = "refusal|compliance" if task == "completion" else "unharmful|harmful"
    pattern = re.compile(rf"{task}\s*:\s*({labels})\b", re.IGNORECASE)
    count = 0
    path = shared_dir / "predictions" / size / f"{name}.jsonl"
    for line in path.read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        text = json.loads(line)["predict"]
        tail, final = pattern.search(text[-300:]), pattern.search(text[text.rfind("Answers") :])
        count += bool(tail and final and tail.group(1).lower() != final.group(1).lower())
    return count


@pytest.mark.parametrize("size", SIZES)
def test_cli_project_rule_is_not_worse(
    shared_dir: Path, capsys: pytest.CaptureFixture[str], size: str
) -> None:
    """Scored alike (an unread output counted once as wrong), the project rule's F1 is at least
    the reference rule's in every cell but those where the model's final block contradicts what
    the paper's pattern reads (the final block wins by design; see test_parser), and it never
    leaves more outputs unread than the README reports."""
    replay = str(shared_dir / "predictions" / size)
    project = _cli_rows(capsys, "--rule", "project", "--replay", replay)
    reference = _cli_rows(capsys, "--rule", "reference", "--scoring", "honest", "--replay", replay)
    for name, (_, unparsed) in README_FIGURES[size].items():
        assert int(str(project[name]["unparsed"])) <= unparsed
        ours, theirs = float(str(project[name]["f1"])), float(str(reference[name]["f1"]))
        # a loss is the conflict rule's (the model contradicts itself), or the final block's
        explained = float(str(project[name]["f1_if_final"])) >= theirs
        assert ours >= theirs or explained or _contradicted(shared_dir, size, name) > 0, name


def test_cli_tables_and_skipped_benchmarks(
    shared_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    replay = shared_dir / "predictions" / "1B"
    argv = ["evaluate", "--rule", "reference", "--replay", str(replay)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "GuardReasoner 1B" in captured.out
    for title in ("prompt harmfulness", "response harmfulness", "refusal detection"):
        assert title in captured.out
    figures = README_FIGURES["1B"]
    prompt_sets = ("HarmBenchPrompt", "AegisSafetyTest", "SimpleSafetyTests")
    expected = sum(figures[n][0] * README_SAMPLES[n] for n in prompt_sets) / sum(
        README_SAMPLES[n] for n in prompt_sets
    )
    average = re.search(
        r"prompt harmfulness.*?weighted average\s+(\d+)\s+([\d.]+)", captured.out, re.DOTALL
    )
    assert average is not None
    assert int(average.group(1)) == sum(README_SAMPLES[n] for n in prompt_sets)
    assert float(average.group(2)) == pytest.approx(expected, abs=0.01)
    for missing in ("ToxicChat", "OpenAIModeration", "SafeRLHF", "BeaverTails"):
        assert f"no predictions for {missing}" in captured.err


def test_cli_needs_a_replay_folder(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate"]) == 2
    assert "--replay" in capsys.readouterr().err


def test_benchmark_inputs_equal_the_recorded_model_inputs(shared_dir: Path) -> None:
    """instruction + "\\n" + input is exactly what the model was fed (the README's first trap)."""
    for name in README_FIGURES["8B"]:
        benchmark = BY_NAME[name]
        from_benchmark = load_benchmark_samples(
            shared_dir / "benchmark" / benchmark.file, benchmark
        )
        recorded = load_prediction_samples(
            shared_dir / "predictions" / "8B" / f"{name}.jsonl", benchmark
        )
        assert from_benchmark == recorded


def test_gold_labels_of_answer_blocks(shared_dir: Path) -> None:
    benchmark = BY_NAME["SafeRLHF"]
    samples = load_benchmark_samples(shared_dir / "benchmark" / benchmark.file, benchmark)
    assert len(samples) == 2000
    assert {s.gold for s in samples} == {"harmful", "unharmful"}
    assert all(s.has_response for s in samples)


def test_score_counts_unread_outputs_per_policy() -> None:
    gold = ["harmful", "harmful", "harmful", "unharmful", "unharmful"]
    predicted = ["harmful", None, None, None, "unharmful"]
    # honest: tp 1, fn 2 (the unread harmful), fp 1 (the unread unharmful): 2 / (2 + 1 + 2)
    assert score(gold, predicted, "request", "honest").f1 == pytest.approx(40.0)
    # paper: the unread harmful are left out, the unread unharmful is two false positives
    paper = score(gold, predicted, "request", "paper")
    assert paper.f1 == pytest.approx(50.0)  # 2 / (2 + 2 + 0)
    assert (paper.samples, paper.unparsed) == (5, 3)
    refusal = score(["refusal", "compliance"], [None, "compliance"], "completion", "paper")
    assert refusal.f1 == 0.0  # the unread refusal is two false negatives
    assert score(["unharmful"], ["unharmful"], "response", "honest").f1 == 0.0


async def test_evaluate_is_engine_agnostic() -> None:
    benchmark = BY_NAME["HarmBenchPrompt"]
    samples = [Sample(f"input {i}", "harmful", False) for i in range(5)]
    batches: list[int] = []

    async def answers(inputs: list[str]) -> list[str]:
        batches.append(len(inputs))
        return ["Answers:\nRequest: harmful\nCompletion: None\nResponse: None"] * len(inputs)

    progress: list[int] = []
    result = await evaluate(benchmark, samples, answers, batch_size=2, on_progress=progress.append)
    assert (result.score.f1, result.score.unparsed, result.score.samples) == (100.0, 0, 5)
    assert batches == progress == [2, 2, 1]

    async def nothing(inputs: list[str]) -> list[str]:
        return ["" for _ in inputs]

    result = await evaluate(benchmark, samples, nothing)
    assert (result.score.f1, result.score.unparsed) == (0.0, 5)

    async def short(inputs: list[str]) -> list[str]:
        return []

    with pytest.raises(ValueError, match="0 texts for 5 inputs"):
        await evaluate(benchmark, samples, short, batch_size=8)


async def test_backend_generate_keeps_how_each_output_ended() -> None:
    """A failed output counts as an engine error and a cut one as truncated (neither trusted),
    whatever text they carry."""

    class Ending(Backend):
        async def generate(
            self, inputs: Sequence[str], max_new_tokens: int, stop: Stops = None
        ) -> list[Generation]:
            block = "Answers:\nRequest: unharmful\nCompletion: None\nResponse: None"
            return [
                Generation(block),
                Generation(block, finish_reason="error", error="x"),
                Generation(block, finish_reason="length"),
            ]

    generate = backend_generate(Ending("m", "r"), 16)
    samples = [Sample(f"input {i}", "unharmful", False) for i in range(3)]
    result = await evaluate(BY_NAME["HarmBenchPrompt"], samples, generate, batch_size=3)
    assert result.trust == {"engine_error": 1, "final": 1, "truncated": 1}
    assert result.untrusted == 2 and result.score.unparsed == 1


# Early exit ---------------------------------------------------------------------------------

PROMPT_SETS = ("HarmBenchPrompt", "AegisSafetyTest", "SimpleSafetyTests")
APPROXIMATE = "tokens: approximate, 4 chars/token"


def test_cli_early_exit_rows(shared_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    replay = str(shared_dir / "predictions" / "1B")
    rows = _cli_rows(capsys, "--early-exit", "--replay", replay)
    assert set(rows) == set(README_FIGURES["1B"])
    for name, row in rows.items():
        assert row["model"] == "1B"
        assert row["token_count"] == APPROXIMATE
        early = row["early_exit"]
        if name not in PROMPT_SETS:
            assert early is None, name  # response benchmarks: generated in full
            continue
        assert isinstance(early, dict)
        assert float(early["f1"]) >= float(str(row["f1"]))
        assert float(early["tokens_per_verdict"]) < float(str(row["tokens_per_verdict"]))
        assert early["stopped"] == row["samples"] == README_SAMPLES[name]
        assert 0 <= int(early["regenerated"]) < int(early["stopped"])
    plain = _cli_rows(capsys, "--replay", replay)
    assert all("early_exit" not in row for row in plain.values())


def test_cli_early_exit_table_for_several_models(
    shared_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    predictions = shared_dir / "predictions"
    argv = ["evaluate", "--early-exit", "--replay", str(predictions / "1B")]
    assert main([*argv, "--replay", str(predictions / "3B")]) == 0
    out = capsys.readouterr().out
    assert "GuardReasoner 1B" in out and "GuardReasoner 3B" in out
    table = out[out.index("early exit:") :]
    assert APPROXIMATE in table
    for size in ("1B", "3B"):
        for name in README_FIGURES[size]:
            line = re.search(rf"^{size}\s+{name}\s.*$", table, re.MULTILINE)
            assert line is not None, (size, name)
            cells = line.group(0).split()
            assert ("n/a" in cells) == (name not in PROMPT_SETS)
            if name in PROMPT_SETS:  # F1 full, early; tokens full, early; regenerated
                f1_full, f1_early, tokens_full, tokens_early = map(float, cells[3:7])
                assert f1_early >= f1_full and tokens_early < tokens_full


@pytest.mark.parametrize("bad", ["rule", "label", "tokenizer"])
def test_cli_early_exit_refuses_what_it_cannot_do(
    shared_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path, bad: str
) -> None:
    replay = str(shared_dir / "predictions" / "1B")
    extra = {
        "rule": ["--rule", "reference"],
        "label": ["--replay", replay, "--model-size-label", "x"],
        "tokenizer": ["--tokenizer", str(tmp_path / "nowhere")],
    }[bad]
    assert main(["evaluate", "--early-exit", "--replay", replay, *extra]) == 2
    assert "evaluate:" in capsys.readouterr().err


def _word_tokenizer(tmp_path: Path) -> Path:
    """A tokenizer built here (no hub): one token per word or run of punctuation."""
    tokenizers = pytest.importorskip("tokenizers", reason="the hf extra is not installed")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def _words(text: str) -> int:
    """The same count, independently of the tokenizer library."""
    return len(re.findall(r"\w+|[^\w\s]+", text))


@pytest.mark.parametrize("form", ["file", "folder"])
def test_cli_counts_tokens_with_a_local_tokenizer(
    shared_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path, form: str
) -> None:
    path = _word_tokenizer(tmp_path)
    if form == "folder":
        transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
        folder = tmp_path / "saved"
        transformers.PreTrainedTokenizerFast(tokenizer_file=str(path)).save_pretrained(folder)
        path = folder
    replay = shared_dir / "predictions" / "1B"
    rows = _cli_rows(capsys, "--early-exit", "--tokenizer", str(path), "--replay", str(replay))
    row = rows["SimpleSafetyTests"]
    assert str(row["token_count"]).startswith(f"tokens: tokenizer {path}")
    records = [
        json.loads(line)["predict"]
        for line in (replay / "SimpleSafetyTests.jsonl").read_text(encoding="utf-8").split("\n")
        if line.strip()
    ]
    full = sum(_words(text) + 1 for text in records) / len(records)  # + end of sequence
    assert float(str(row["tokens_per_verdict"])) == pytest.approx(full)
    early = row["early_exit"]
    assert isinstance(early, dict)
    regenerated = int(early["regenerated"])
    cut = sum(_words(t[: t.index(EARLY_EXIT_STOP) + len(EARLY_EXIT_STOP)]) for t in records)
    # the early tokens: every stopped output, plus the full ones of those regenerated
    assert float(early["tokens_per_verdict"]) * len(records) >= cut
    assert float(early["tokens_per_verdict"]) * len(records) <= cut + regenerated * max(
        _words(t) + 1 for t in records
    )
    assert "tokens: tokenizer" in _text_run(capsys, "--tokenizer", str(path), str(replay))


def _text_run(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    *options, replay = args
    assert main(["evaluate", "--early-exit", *options, "--replay", replay]) == 0
    return capsys.readouterr().out
