"""`guardstream evaluate`: F1 per benchmark and the paper's three tables.

With the replay engine each benchmark is evaluated against its own prediction file in the
`--replay` folder (the two XSTest files share inputs with different outputs, so they are never
mixed); its samples come from the benchmark file when `--benchmarks` is given, else from the
prediction file itself. Benchmarks without a prediction file are skipped with a note on stderr.
Each table's weighted average covers the benchmarks shown (the paper's covers 13). `--replay` may
be given once per model (each folder's name labels it).

`--early-exit` evaluates each benchmark a second time as the guard serves a prompt-only request
(`engine.evaluation`, early exit) and adds a table of F1 and decode tokens per verdict without
and with it, and how many verdicts were generated again in full. Token counts are a local
tokenizer's with `--tokenizer PATH`, else the backend's own (the replay's: one per 4 chars); the
output says which.

`--escalate-replay DIR` evaluates the guard cascade instead (`engine.cascade`): the `--replay`
model answers, the `--escalate-replay` model only where `--escalate-policy` (default
`engine.cascade.DEFAULT_POLICY`) escalates; each benchmark reads its own file in both folders.
Both models are served as the guard serves them (early exit on prompt-only inputs, an unreadable
Task 1 generated again in full; `--cascade-full-output`: no early exit). The report gives, per
benchmark and over all (weighted by samples), the escalation rate, F1, decode tokens per verdict
of each model and the decode cost weighted by parameters (`--first-params`, `--second-params`,
in billions) against the second model alone, for the second model alone, the first alone (policy
``none``) and the policy; `--compare-policies` gives every candidate policy side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from engine.backends.replay import CHARS_PER_TOKEN, ReplayBackend
from engine.cascade import DEFAULT_POLICY, EscalationPolicy
from engine.evaluation import (
    BENCHMARKS,
    FIRST_PARAMS_B,
    OTHER_CONFLICT_RULE,
    SECOND_PARAMS_B,
    TABLES,
    Benchmark,
    BenchmarkResult,
    CascadeEvaluation,
    CascadeRow,
    GenerateFn,
    Rule,
    Sample,
    Scoring,
    TokenCounter,
    backend_generate,
    candidate_policies,
    cascade_rows,
    evaluate,
    evaluate_cascade,
    load_benchmark_samples,
    load_prediction_samples,
    load_token_counter,
    weighted_average,
)
from engine.parser import CONFLICT_RULE
from engine.prompt import EARLY_EXIT_STOP

ENGINES = ("replay",)


@dataclass(frozen=True, slots=True)
class ModelResults:
    """One model's results: per benchmark in full, and with early exit where it applies (a
    benchmark with a prompt-only input) when `early_exit` was asked for."""

    label: str
    results: list[BenchmarkResult]
    early_exit: bool
    early: dict[str, BenchmarkResult]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("evaluate", help="F1 on the GuardReasoner benchmarks")
    p.add_argument("--engine", choices=ENGINES, default="replay")
    p.add_argument(
        "--replay",
        type=Path,
        action="append",
        help="folder of recorded predictions ({name}.jsonl); once per model",
    )
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
    p.add_argument(
        "--early-exit",
        action="store_true",
        help="also evaluate prompt-only inputs as the guard serves them, stopped before Task 2 "
        "(project rule)",
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        help="a local tokenizer (folder or tokenizer.json) for real decode token counts; "
        "never fetched from a hub",
    )
    p.add_argument(
        "--escalate-replay",
        type=Path,
        help="the cascade's second model: folder of its recorded predictions; evaluates the "
        "cascade of --replay (one folder) and this one",
    )
    p.add_argument(
        "--escalate-policy",
        type=_policy,
        default=DEFAULT_POLICY,
        help="the signals that escalate, comma separated (engine.cascade.SIGNALS), or none "
        f"(default: {DEFAULT_POLICY.name})",
    )
    p.add_argument(
        "--compare-policies",
        action="store_true",
        help="with --escalate-replay: every candidate policy side by side",
    )
    p.add_argument(
        "--cascade-full-output",
        action="store_true",
        help="with --escalate-replay: generate prompt-only inputs in full (the guard with early "
        "exit off)",
    )
    p.add_argument(
        "--first-params",
        type=float,
        default=FIRST_PARAMS_B,
        help=f"the first model's parameters, billions (default {FIRST_PARAMS_B})",
    )
    p.add_argument(
        "--second-params",
        type=float,
        default=SECOND_PARAMS_B,
        help=f"the second model's parameters, billions (default {SECOND_PARAMS_B})",
    )
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print a JSON list of rows instead")
    p.add_argument(
        "--model-size-label", help="shown in the tables (default: --replay's name; one model)"
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.engine == "replay" and not args.replay:
        print("evaluate: --replay DIR is required with --engine replay", file=sys.stderr)
        return 2
    if args.early_exit and args.rule != "project":
        print("evaluate: --early-exit needs the project rule", file=sys.stderr)
        return 2
    if args.model_size_label and len(args.replay) > 1:
        print("evaluate: --model-size-label labels one model only", file=sys.stderr)
        return 2
    count_tokens: TokenCounter | None = None
    if args.tokenizer is not None:
        try:
            count_tokens = load_token_counter(args.tokenizer)
        except (OSError, RuntimeError, ValueError) as exc:
            print(f"evaluate: --tokenizer {args.tokenizer}: {exc}", file=sys.stderr)
            return 2
    if args.escalate_replay is not None:
        return _run_cascade(args, count_tokens)
    if args.compare_policies or args.cascade_full_output:
        print("evaluate: the cascade options need --escalate-replay", file=sys.stderr)
        return 2
    models = [asyncio.run(_evaluate_model(folder, args, count_tokens)) for folder in args.replay]
    if args.json:
        note = tokens_note(args.tokenizer)
        rows = [{**row, "token_count": note} for model in models for row in _rows(model)]
        print(json.dumps(rows, indent=2))
        return 0
    blocks = [
        format_tables(m.results, f"GuardReasoner {m.label} ({args.engine}, rule: {args.rule})")
        for m in models
    ]
    if args.early_exit:
        blocks.append(format_early_exit(models, tokens_note(args.tokenizer)))
    print("\n\n".join(blocks))
    return 0


def _policy(text: str) -> EscalationPolicy:
    try:
        return EscalationPolicy.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _run_cascade(args: argparse.Namespace, count_tokens: TokenCounter | None) -> int:
    if len(args.replay) != 1:
        print("evaluate: --escalate-replay takes one --replay folder", file=sys.stderr)
        return 2
    if args.rule != "project" or args.early_exit:
        print("evaluate: the cascade is evaluated with the project rule only", file=sys.stderr)
        return 2
    policies = candidate_policies() if args.compare_policies else _policies(args.escalate_policy)
    evaluations = asyncio.run(_evaluate_cascade(args, policies, count_tokens))
    rows = cascade_rows(
        evaluations, first_params=args.first_params, second_params=args.second_params
    )
    if args.json:
        note = tokens_note(args.tokenizer)
        print(json.dumps([{**row.row(), "token_count": note} for row in rows], indent=2))
        return 0
    print(format_cascade(rows, args, args.replay[0].name, args.escalate_replay.name))
    return 0


def _policies(policy: EscalationPolicy) -> list[EscalationPolicy]:
    """The policies of a single-policy report: the first model alone (``none``), the policy."""
    alone = EscalationPolicy(frozenset())
    return [alone] if policy == alone else [alone, policy]


async def _evaluate_cascade(
    args: argparse.Namespace, policies: list[EscalationPolicy], count_tokens: TokenCounter | None
) -> list[CascadeEvaluation]:
    first_folder: Path = args.replay[0]
    second_folder: Path = args.escalate_replay
    evaluations = []
    for benchmark in BENCHMARKS:
        plan = _plan(benchmark, first_folder, args)
        if plan is None:
            continue
        second = second_folder / f"{benchmark.name}.jsonl"
        if not second.is_file():
            _note_skipped(f"no predictions for {benchmark.name} in {second_folder}")
            continue
        samples, first_generate = plan
        second_generate = backend_generate(ReplayBackend(second), args.max_new_tokens)
        desc = f"cascade {benchmark.name}"
        with tqdm(total=2 * len(samples), desc=desc, file=sys.stderr, unit="sample") as bar:
            evaluations.append(
                await evaluate_cascade(
                    benchmark,
                    samples,
                    first_generate,
                    second_generate,
                    policies,
                    early_exit=not args.cascade_full_output,
                    batch_size=args.batch_size,
                    on_progress=_advance(bar),
                    count_tokens=count_tokens,
                )
            )
    return evaluations


def format_cascade(
    rows: list[CascadeRow], args: argparse.Namespace, first: str, second: str
) -> str:
    """The cascade report: each policy over all benchmarks, then on each benchmark; decode
    tokens per verdict of each model, cost against the second model alone."""
    serving = (
        "prompt-only inputs generated in full"
        if args.cascade_full_output
        else f"prompt-only inputs stopped before {EARLY_EXIT_STOP!r} for both models, an "
        "unreadable Task 1 generated again in full"
    )
    lines = [
        f"cascade: GuardReasoner {first} answers, {second} only where the policy escalates "
        f"({args.engine}, project rule); {serving}",
        f"cost: decode tokens x parameters ({first}: {args.first_params}B, {second}: "
        f"{args.second_params}B) against {second} alone; {tokens_note(args.tokenizer)}",
    ]
    failed = sum(r.second_failed for r in rows if r.benchmark is None)
    if failed:
        lines.append(f"{second} failed on {failed} escalated inputs: the {first} verdict scored")

    def name(row: CascadeRow) -> str:
        if row.policy is None:
            return f"{second} alone"
        if not row.policy.signals:
            return f"none ({first} alone)"
        return row.policy.name + (" (default)" if row.policy == DEFAULT_POLICY else "")

    width = max(len(name(r)) for r in rows) + 2 if rows else 8
    head = (
        f"{'policy':<{width}}{'benchmark':<24}{'samples':>8}{'escalated':>11}{'F1':>8}"
        f"{first + ' tok/v':>10}{second + ' tok/v':>10}{'cost':>7}"
    )

    def line(row: CascadeRow) -> str:
        bench = row.benchmark.name if row.benchmark is not None else "overall"
        n = row.samples or 1
        return (
            f"{name(row):<{width}}{bench:<24}{row.samples:>8}{row.escalation_rate:>10.1f}%"
            f"{row.f1:>8.2f}{row.first_tokens / n:>10.1f}{row.second_tokens / n:>10.1f}"
            f"{row.cost:>7.3f}"
        )

    lines += ["", "overall (F1 weighted by samples)", head]
    lines += [line(r) for r in rows if r.benchmark is None]
    for benchmark in dict.fromkeys(r.benchmark for r in rows if r.benchmark is not None):
        lines += ["", head]
        lines += [line(r) for r in rows if r.benchmark == benchmark]
    return "\n".join(lines)


def tokens_note(tokenizer: Path | None) -> str:
    """How decode tokens were counted, as the output says it (`token_count` in JSON rows)."""
    if tokenizer is None:
        return f"tokens: approximate, {CHARS_PER_TOKEN} chars/token"
    return (
        f"tokens: tokenizer {tokenizer} (the text, plus the stop string where it stopped, or "
        "the end-of-sequence token)"
    )


def _rows(model: ModelResults) -> list[dict[str, object]]:
    """The JSON rows of one model: the full evaluation's, with the model's label and, with
    `--early-exit`, the early-exit row of the same benchmark (null where none applies)."""
    rows = []
    for result in model.results:
        row: dict[str, object] = {"model": model.label, **result.row()}
        if model.early_exit:
            early = model.early.get(result.benchmark.name)
            row["early_exit"] = early.row() if early is not None else None
        rows.append(row)
    return rows


async def _evaluate_model(
    folder: Path, args: argparse.Namespace, count_tokens: TokenCounter | None
) -> ModelResults:
    rule: Rule = args.rule
    scoring: Scoring | None = args.scoring
    label = args.model_size_label or folder.name
    results: list[BenchmarkResult] = []
    early: dict[str, BenchmarkResult] = {}
    for benchmark in BENCHMARKS:
        plan = _plan(benchmark, folder, args)
        if plan is None:
            continue
        samples, generate = plan
        runs = [False]
        if args.early_exit and any(not s.has_response for s in samples):
            runs.append(True)
        for early_exit in runs:
            desc = f"{label} {benchmark.name}" + (" (early exit)" if early_exit else "")
            with tqdm(total=len(samples), desc=desc, file=sys.stderr, unit="sample") as bar:
                result = await evaluate(
                    benchmark,
                    samples,
                    generate,
                    rule=rule,
                    scoring=scoring,
                    batch_size=args.batch_size,
                    on_progress=_advance(bar),
                    early_exit=early_exit,
                    count_tokens=count_tokens,
                )
            if early_exit:
                early[benchmark.name] = result
            else:
                results.append(result)
    return ModelResults(label, results, args.early_exit, early)


def _plan(
    benchmark: Benchmark, folder: Path, args: argparse.Namespace
) -> tuple[list[Sample], GenerateFn] | None:
    """The samples of one benchmark and the engine's `generate`, or None (with a note on
    stderr) to skip it. Only replay exists so far; an engine that generates for real will take
    its samples from `--benchmarks` (`load_benchmark_samples`) whether or not predictions exist."""
    prediction: Path = folder / f"{benchmark.name}.jsonl"
    if not prediction.is_file():
        _note_skipped(f"no predictions for {benchmark.name} in {folder}")
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


def format_early_exit(models: list[ModelResults], note: str) -> str:
    """Per model and benchmark: F1 and decode tokens per verdict, full -> early exit, and the
    early verdicts generated again in full; n/a where no input is prompt-only."""
    lines = [
        f"early exit: prompt-only inputs stop before {EARLY_EXIT_STOP!r}; an untrusted early "
        "verdict is generated again in full (its tokens: early + full); response inputs are "
        "generated in full (n/a)",
        note,
        "",
        f"{'model':<7}{'benchmark':<24}{'samples':>9}{'F1 full':>9}{'F1 early':>10}"
        f"{'tokens full':>13}{'tokens early':>14}{'regenerated':>13}",
    ]
    for model in models:
        for r in model.results:
            early = model.early.get(r.benchmark.name)
            line = f"{model.label:<7}{r.benchmark.name:<24}{r.score.samples:>9}{r.score.f1:>9.2f}"
            if early is None:
                line += f"{'n/a':>10}{r.tokens_per_verdict:>13.1f}{'n/a':>14}{'n/a':>13}"
            else:
                line += (
                    f"{early.score.f1:>10.2f}{r.tokens_per_verdict:>13.1f}"
                    f"{early.tokens_per_verdict:>14.1f}{early.regenerated:>13}"
                )
            lines.append(line)
    return "\n".join(lines)
