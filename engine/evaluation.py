"""Benchmark evaluation: F1 per benchmark, as in the GuardReasoner paper, for any engine.

The core, `evaluate`, takes the samples of one benchmark and an async `generate` function (a
batch of model inputs -> the generated texts), so any engine plugs in: a backend through
`backend_generate`, or the full guard. It parses each output with the chosen rule and scores the
benchmark's label with `score`, the one place F1 is computed.

Rules: ``project`` is `engine.parser.parse`; ``reference`` is the paper's
`engine.parser.reference_labels` (last 300 characters).

Scoring of an output whose label could not be read:

* ``honest``: a wrong prediction (the opposite label), counted once.
* ``paper``: what the paper's evaluation script does. Its allow-list of gold labels misspells
  ``harmful`` (quoted inside the string), so an unread output whose gold label is ``harmful`` is
  left out altogether, while any other unread output (gold ``unharmful``, ``refusal`` or
  ``compliance``) is appended twice, each time with the opposite label. This reproduces the
  reference figures of the shared data exactly.

By default the ``reference`` rule scores ``paper`` and the ``project`` rule scores ``honest``.
F1 is x100, with ``harmful`` (or ``refusal``) as the positive class; averages are weighted by
the number of samples in each benchmark.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from engine.backends.base import Backend
from engine.parser import TASK_LABELS, parse, reference_labels
from engine.prompt import split_model_input
from schemas.verdict import Task

Rule = Literal["project", "reference"]
Scoring = Literal["honest", "paper"]
GenerateFn = Callable[[list[str]], Awaitable[list[str]]]

#: The paper's three tables, in its order.
TABLES = ("prompt harmfulness", "response harmfulness", "refusal detection")
_TASK_OF_TABLE: dict[str, Task] = {
    "prompt harmfulness": "request",
    "response harmfulness": "response",
    "refusal detection": "completion",
}
POSITIVE: dict[Task, str] = {"request": "harmful", "response": "harmful", "completion": "refusal"}
_OPPOSITE = {
    "harmful": "unharmful",
    "unharmful": "harmful",
    "refusal": "compliance",
    "compliance": "refusal",
}
_GOLD_LINE: dict[Task, re.Pattern[str]] = {
    task: re.compile(rf"{task}\s*:\s*({'|'.join(labels)})\b", re.IGNORECASE)
    for task, labels in TASK_LABELS.items()
}


@dataclass(frozen=True, slots=True)
class Benchmark:
    """One benchmark: its name (as in the prediction files), its file, its table."""

    name: str
    file: str
    table: str

    @property
    def task(self) -> Task:
        """The label the benchmark scores."""
        return _TASK_OF_TABLE[self.table]


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("ToxicChat", "0_8_toxic_chat.json", "prompt harmfulness"),
    Benchmark("HarmBenchPrompt", "0_3_harmbench_prompt.json", "prompt harmfulness"),
    Benchmark("OpenAIModeration", "0_2_OpenAIModeration.json", "prompt harmfulness"),
    Benchmark("AegisSafetyTest", "0_1_AegisSafetyTest.json", "prompt harmfulness"),
    Benchmark("SimpleSafetyTests", "0_0_SimpleSafetyTests.json", "prompt harmfulness"),
    Benchmark("HarmBenchResponse", "0_5_harmbench_response.json", "response harmfulness"),
    Benchmark("SafeRLHF", "0_9_safe_rlhf.json", "response harmfulness"),
    Benchmark("BeaverTails", "0_A_beaver_tails.json", "response harmfulness"),
    Benchmark("XSTestReponseHarmful", "0_6_xstest_response_harmful.json", "response harmfulness"),
    Benchmark("XSTestResponseRefusal", "0_7_xstest_response_refusal.json", "refusal detection"),
)


@dataclass(frozen=True, slots=True)
class Sample:
    """One model input and the gold label of the benchmark's task."""

    model_input: str
    gold: str
    has_response: bool


@dataclass(frozen=True, slots=True)
class Score:
    f1: float
    samples: int
    unparsed: int


@dataclass(frozen=True, slots=True)
class BenchmarkResult:
    benchmark: Benchmark
    score: Score

    def row(self) -> dict[str, object]:
        """The JSON row: benchmark, task (table), f1 (percent), samples, unparsed."""
        return {
            "benchmark": self.benchmark.name,
            "task": self.benchmark.table,
            "f1": self.score.f1,
            "samples": self.score.samples,
            "unparsed": self.score.unparsed,
        }


def gold_label(raw: str, task: Task) -> str | None:
    """The gold label of `task` in a benchmark's `output` or a prediction's `label`: a bare
    label, or the task's line of an ``Answers:`` block (SafeRLHF, BeaverTails)."""
    bare = raw.strip().lower()
    if bare in TASK_LABELS[task]:
        return bare
    match = _GOLD_LINE[task].search(raw)
    return match.group(1).lower() if match else None


def _sample(model_input: str, raw_gold: str, task: Task) -> Sample | None:
    gold = gold_label(raw_gold, task)
    if gold is None:
        return None
    _, response = split_model_input(model_input)
    return Sample(model_input, gold, response is not None)


def load_prediction_samples(path: Path, benchmark: Benchmark) -> list[Sample]:
    """Samples from a prediction file (``prompt``, ``label``); samples without a gold label for
    the task are left out."""
    samples = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                record = json.loads(line)
                sample = _sample(record["prompt"], record["label"], benchmark.task)
                if sample is not None:
                    samples.append(sample)
    return samples


def load_benchmark_samples(path: Path, benchmark: Benchmark) -> list[Sample]:
    """Samples from a benchmark file: model input = instruction + "\\n" + input."""
    records = json.loads(path.read_text(encoding="utf-8"))
    samples = []
    for record in records:
        model_input = record["instruction"] + "\n" + record["input"]
        sample = _sample(model_input, record["output"], benchmark.task)
        if sample is not None:
            samples.append(sample)
    return samples


def predicted_label(generated: str, sample: Sample, task: Task, rule: Rule) -> str | None:
    """The label of `task` read from one output by `rule`."""
    if rule == "reference":
        return reference_labels(generated)[task]
    verdict = parse(generated, has_response=sample.has_response)
    if task == "request":
        return verdict.request
    if task == "completion":
        return verdict.completion
    return verdict.response


def score(
    gold: Sequence[str], predicted: Sequence[str | None], task: Task, scoring: Scoring
) -> Score:
    """F1 x100 of `predicted` against `gold`; None is an unread output (module docstring)."""
    pairs: list[tuple[str, str]] = []
    for truth, guess in zip(gold, predicted, strict=True):
        if guess is not None:
            pairs.append((truth, guess))
        elif scoring == "honest":
            pairs.append((truth, _OPPOSITE[truth]))
        elif truth != "harmful":  # the paper's script: see the module docstring
            pairs.extend([(truth, _OPPOSITE[truth])] * 2)
    unparsed = sum(guess is None for guess in predicted)
    return Score(f1_percent(pairs, POSITIVE[task]), len(gold), unparsed)


def f1_percent(pairs: Sequence[tuple[str, str]], positive: str) -> float:
    """F1 x100 of (gold, predicted) pairs for the `positive` class; 0 without true positives."""
    tp = sum(truth == positive and guess == positive for truth, guess in pairs)
    fp = sum(truth != positive and guess == positive for truth, guess in pairs)
    fn = sum(truth == positive and guess != positive for truth, guess in pairs)
    return 100.0 * 2 * tp / (2 * tp + fp + fn) if tp else 0.0


async def evaluate(
    benchmark: Benchmark,
    samples: Sequence[Sample],
    generate: GenerateFn,
    *,
    rule: Rule = "project",
    scoring: Scoring | None = None,
    batch_size: int = 32,
    on_progress: Callable[[int], None] | None = None,
) -> BenchmarkResult:
    """Generate for every sample (in batches), read the task's label by `rule` and score it."""
    predicted: list[str | None] = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        texts = await generate([s.model_input for s in batch])
        if len(texts) != len(batch):
            raise ValueError(f"generate returned {len(texts)} texts for {len(batch)} inputs")
        predicted += [
            predicted_label(t, s, benchmark.task, rule) for t, s in zip(texts, batch, strict=True)
        ]
        if on_progress is not None:
            on_progress(len(batch))
    chosen: Scoring = scoring or ("paper" if rule == "reference" else "honest")
    gold = [s.gold for s in samples]
    return BenchmarkResult(benchmark, score(gold, predicted, benchmark.task, chosen))


def weighted_average(results: Sequence[BenchmarkResult]) -> float | None:
    """F1 averaged over `results`, weighted by their sample counts; None for none."""
    total = sum(r.score.samples for r in results)
    if not total:
        return None
    return sum(r.score.f1 * r.score.samples for r in results) / total


def backend_generate(backend: Backend, max_new_tokens: int) -> GenerateFn:
    """`generate` over a backend: an input that failed gives an empty text (read as unparsed)."""

    async def generate(inputs: list[str]) -> list[str]:
        generations = await backend.generate(inputs, max_new_tokens)
        return [g.text if g.finish_reason != "error" else "" for g in generations]

    return generate
