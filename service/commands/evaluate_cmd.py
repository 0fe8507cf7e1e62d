"""`guardstream evaluate`: F1 per benchmark and the paper's three tables.

With the replay engine each benchmark is evaluated against its own prediction file in the
`--replay` folder (the two XSTest files share inputs with different outputs, so they are never
mixed); its samples come from the benchmark file when `--benchmarks` is given, else from the
prediction file itself. Benchmarks without a prediction file are skipped with a note on stderr.
Each table's weighted average covers the benchmarks shown (the paper's covers 13).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from engine.backends.replay import ReplayBackend
from engine.evaluation import (
    BENCHMARKS,
    OTHER_CONFLICT_RULE,
    TABLES,
    Benchmark,
    BenchmarkResult,
    GenerateFn,
    Rule,
    Sample,
    Scoring,
    backend_generate,
    evaluate,
    load_benchmark_samples,
    load_prediction_samples,
    weighted_average,
)
from engine.parser import CONFLICT_RULE

ENGINES = ("replay",)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("evaluate", help="F1 on the GuardReasoner benchmarks")
    p.add_argument("--engine", choices=ENGINES, default="replay")
    p.add_argument("--replay", type=Path, help="folder of recorded predictions ({name}.jsonl)")
    p.add_argument("--benchmarks", type=Path, help="folder of benchmark files (0_0_*.json ...)")
    p.add_argument(
        "--rule",
        choices=("project", "reference"),
        default="project",
        help="project: engine.parser.parse; reference: the paper's rule",
    )
    p.add_argument(
        "--scoring",
        choices=("honest", "paper"),
        help="how an unread output counts (default: paper for the reference rule, "
        "honest for the project rule)",
    )
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print a JSON list of rows instead")
    p.add_argument("--model-size-label", help="shown in the tables (default: --replay's name)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.engine == "replay" and args.replay is None:
        print("evaluate: --replay DIR is required with --engine replay", file=sys.stderr)
        return 2
    results = asyncio.run(_evaluate_all(args))
    if args.json:
        print(json.dumps([r.row() for r in results], indent=2))
    else:
        label = args.model_size_label or (args.replay.name if args.replay else "model")
        print(format_tables(results, f"GuardReasoner {label} ({args.engine}, rule: {args.rule})"))
    return 0


async def _evaluate_all(args: argparse.Namespace) -> list[BenchmarkResult]:
    rule: Rule = args.rule
    scoring: Scoring | None = args.scoring
    results = []
    for benchmark in BENCHMARKS:
        plan = _plan(benchmark, args)
        if plan is None:
            continue
        samples, generate = plan
        with tqdm(total=len(samples), desc=benchmark.name, file=sys.stderr, unit="sample") as bar:
            result = await evaluate(
                benchmark,
                samples,
                generate,
                rule=rule,
                scoring=scoring,
                batch_size=args.batch_size,
                on_progress=_advance(bar),
            )
        results.append(result)
    return results


def _plan(benchmark: Benchmark, args: argparse.Namespace) -> tuple[list[Sample], GenerateFn] | None:
    """The samples of one benchmark and the engine's `generate`, or None (with a note on
    stderr) to skip it. Only replay exists so far; an engine that generates for real will take
    its samples from `--benchmarks` (`load_benchmark_samples`) whether or not predictions exist."""
    prediction: Path = args.replay / f"{benchmark.name}.jsonl"
    if not prediction.is_file():
        _note_skipped(f"no predictions for {benchmark.name} in {args.replay}")
        return None
    if args.benchmarks is None:
        samples = load_prediction_samples(prediction, benchmark)
    elif (args.benchmarks / benchmark.file).is_file():
        samples = load_benchmark_samples(args.benchmarks / benchmark.file, benchmark)
    else:
        _note_skipped(f"no {benchmark.file} in {args.benchmarks}")
        return None
    return samples, backend_generate(ReplayBackend(prediction), args.max_new_tokens)


def _note_skipped(reason: str) -> None:
    print(f"note: {reason}; skipped", file=sys.stderr)


def _advance(bar: tqdm[object]) -> Callable[[int], None]:
    def advance(n: int) -> None:
        bar.update(n)

    return advance


def format_tables(results: list[BenchmarkResult], title: str) -> str:
    """The paper's three tables: F1 per benchmark and the weighted average; for the project
    rule also the verdicts that are not trusted, the conflicting ones, and the F1 the other
    conflict rule gives (`engine.evaluation.OTHER_CONFLICT_RULE`)."""
    project = any(r.trust for r in results)
    lines = [title]
    if project:
        lines.append(
            f"conflicts resolved by the {CONFLICT_RULE!r} rule; F1 if {OTHER_CONFLICT_RULE!r} "
            "alongside; untrusted: incomplete, conflicting, unparsed, truncated or failed "
            "(flagged under fail_closed)"
        )
    head = f"{'benchmark':<24}{'samples':>9}{'unparsed':>10}"
    if project:
        head += f"{'untrusted':>11}{'conflicting':>13}"
    head += f"{'F1':>9}"
    if project:
        head += f"{'F1 ' + OTHER_CONFLICT_RULE:>10}"
    for table in TABLES:
        rows = [r for r in results if r.benchmark.table == table]
        if not rows:
            continue
        lines += ["", table, head]
        for r in rows:
            s = r.score
            line = f"{r.benchmark.name:<24}{s.samples:>9}{s.unparsed:>10}"
            if project:
                line += f"{r.untrusted:>11}{r.trust.get('conflicting', 0):>13}"
            line += f"{s.f1:>9.2f}"
            if project and r.f1_other_rule is not None:
                line += f"{r.f1_other_rule:>10.2f}"
            lines.append(line)
        average = weighted_average(rows)
        total = sum(r.score.samples for r in rows)
        if average is not None:
            pad = 24 if project else 0
            line = f"{'weighted average':<24}{total:>9}{'':>10}{'':>{pad}}{average:>9.2f}"
            if project:
                other = [r for r in rows if r.f1_other_rule is not None]
                n = sum(r.score.samples for r in other)
                if n:
                    avg = sum((r.f1_other_rule or 0.0) * r.score.samples for r in other) / n
                    line += f"{avg:>10.2f}"
            lines.append(line)
    if project:
        states: dict[str, int] = {}
        for r in results:
            for state, n in r.trust.items():
                states[state] = states.get(state, 0) + n
        lines += ["", "trust states: " + ", ".join(f"{k} {v}" for k, v in sorted(states.items()))]
    return "\n".join(lines)
