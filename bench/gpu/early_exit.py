"""Early exit on the `hf` backend: decode throughput with and without it, next to the decode
roofline, on a GuardReasoner-1B-shaped model with random weights (nothing is downloaded).

    python -m bench.gpu.early_exit            # one GPU: batch sizes 1 to 256
    python -m bench.gpu.early_exit --quick    # a tiny model on CPU in seconds (the tests run it)

The full run is sized for under 8 minutes on one H200 (an estimate: ~5,800 decode steps of
batches, no GPU has run it yet); --deadline-s (450 s from the start) skips the batch sizes that
would end past it, and says so in the report.

The report is ONE JSON file: `--json PATH`, by default `$OUT/gpu_early_exit.json` where OUT is set,
else `gpu_early_exit.json` in the current folder. It is rewritten after every measurement, so a
run stopped early leaves what it measured; progress lines go to stdout.

What runs. The model is Llama 3.2 1B's shape (hidden 2048, 16 layers, 32 heads, 8 KV heads,
intermediate 8192, vocabulary 128256, tied embeddings), bf16 on CUDA, random weights, behind
`engine.backends.hf.HfBackend`. For each batch size (1, 2, 4, ..., 256) one batch of prompt-only
requests (disjoint batches, in a shuffled order) goes through `HfBackend.generate` three times:
with max_new_tokens=1 (the prefill, timed on its own), "full" (every row decodes its whole
recorded output) and "early_exit" (every row decodes up to the end of `EARLY_EXIT_STOP`,
"\\n# Task 2", with that stop string passed, so the per-step stop check is in the time).
verdicts/s is batch size / call time; tokens/s counts each row's own tokens; the decode figures
leave the prefill out. The batching is static: a batch lasts as long as its longest row, so early
exit helps as far as it shortens each batch's longest output.

Output lengths (the method). Random weights write garbage, which never holds the stop string, so
each row's length is forced to what the real model wrote for its request: EOS ignored, and the
row ended by a per-row cap at its target length (`HfBackend._row_limits`, overridden below; an
ended row is fed padding like a row that met its stop). The targets are GuardReasoner-1B's
recorded greedy outputs for the prompt-harmfulness benchmarks (SimpleSafetyTests,
AegisSafetyTest, HarmBenchPrompt: 698 requests, `predictions/1B` of the shared GuardReasoner
data), at CHARS_PER_TOKEN characters a token (no Llama 3 tokenizer is available offline): full =
the output's characters / 4 + 1 (the EOS), early = (the characters before the stop string + the
stop string's) / 4, or full where the output has no "# Task 2". Lengths are capped at
--max-new-tokens (one recorded output of ~2,230 tokens is the only one above 1,024). Where the
shared folder is absent (the GPU machine has none), the same figures come from
`bench/gpu/recorded_lengths_1b.json`, derived from it by `--write-lengths`; the inputs are then
random text of each recorded input's length in GuardReasoner's format instead of the recorded
inputs. Either way they are tokenized by the random model's own tokenizer (trained on the spot).

Roofline. A decode step reads every weight once and each row's KV cache, so it lasts at least
(weight bytes + batch x context x KV bytes per token) / memory bandwidth, where context is the
batch's padded input width plus half its decode steps (transformers keeps one rectangular cache:
every row is as long as the longest). Memory bandwidth is measured with a device-to-device copy
(bytes read and written; an H200's datasheet says 4.8 TB/s) or given with --bandwidth-gb-s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.gpu import synthetic
from bench.gpu.roofline import measure_bandwidth, model_shape
from engine.backends.hf import HfBackend
from engine.prompt import EARLY_EXIT_STOP, build_model_input

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Lengths derived from the shared recorded outputs, for machines without the shared folder.
LENGTHS_FILE = Path(__file__).with_name("recorded_lengths_1b.json")
#: The prompt-harmfulness benchmarks with recorded outputs: every input is prompt-only.
PROMPT_BENCHMARKS = ("SimpleSafetyTests", "AegisSafetyTest", "HarmBenchPrompt")
#: Characters per Llama 3 token of English text, the estimate the lengths are converted with.
CHARS_PER_TOKEN = 4
JSON_NAME = "gpu_early_exit.json"
MODES = ("full", "early_exit")
FULL_BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
QUICK_BATCH_SIZES = [1, 2, 4]

METHOD = {
    "lengths": (
        "each row's generation is forced to its request's recorded GuardReasoner-1B output "
        "length (EOS ignored, a per-row cap at the target: HfBackend._row_limits), at "
        f"{CHARS_PER_TOKEN} characters a token: full = output/{CHARS_PER_TOKEN} + 1 (EOS); "
        f"early = (characters before {EARLY_EXIT_STOP!r} + its own)/{CHARS_PER_TOKEN}, or full "
        "where it does not occur; then x length_scale, capped at max_new_tokens"
    ),
    "early_exit": (
        f"early_exit rows also get stop={EARLY_EXIT_STOP!r}, so the backend's per-step stop "
        "check (a tail-window decode of each row) is in the time; the random model's garbage "
        "does not hold it, so the cap ends each row"
    ),
    "batching": (
        "static (transformers): an ended row is fed padding, the batch runs until its longest "
        "row ends; one batch per batch size and round, disjoint requests in a shuffled order"
    ),
    "throughput": (
        "verdicts_per_s = rows / generate time; tok_per_s = the rows' own tokens / generate "
        "time; the prefill is timed alone (max_new_tokens=1) and decode_* = without it: "
        "decode_step_ms = (time - prefill) / (steps - 1), steps = the longest row's tokens"
    ),
    "roofline": (
        "decode step >= (weight bytes + rows x (padded input width + steps/2) x KV bytes per "
        "token) / bandwidth; roof_verdicts_per_s = rows / (measured prefill + roofline decode); "
        "roof_fraction = roofline decode time / measured decode time"
    ),
}


# ---- recorded lengths ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Recorded:
    """One prompt-only request of the recorded benchmarks: its model input's length, its
    recorded output's length (characters), and where the early-exit stop string starts in that
    output (-1 where it does not occur: the output is its final block only)."""

    input_chars: int
    output_chars: int
    stop_at: int

    @property
    def full_tokens(self) -> int:
        """Decode steps of the whole output, its EOS included."""
        return math.ceil(self.output_chars / CHARS_PER_TOKEN) + 1

    @property
    def early_tokens(self) -> int:
        """Decode steps with early exit: until the stop string is complete."""
        if self.stop_at < 0:
            return self.full_tokens
        return math.ceil((self.stop_at + len(EARLY_EXIT_STOP)) / CHARS_PER_TOKEN)


def predictions_dir(option: Path | None) -> Path | None:
    """The shared `predictions/1B` folder: `--predictions`, else under $GUARDSTREAM_SHARED_DIR,
    else under ../shared/guardreasoner next to the repository; None where it is not there."""
    if option is not None:
        folder = option
    else:
        env = os.environ.get("GUARDSTREAM_SHARED_DIR")
        base = Path(env) if env else REPO_ROOT.parent / "shared" / "guardreasoner"
        folder = base / "predictions" / "1B"
    if all((folder / f"{name}.jsonl").is_file() for name in PROMPT_BENCHMARKS):
        return folder
    if option is not None:
        raise SystemExit(f"early_exit: no {', '.join(PROMPT_BENCHMARKS)} .jsonl files in {folder}")
    return None


def read_predictions(folder: Path) -> list[tuple[str, str]]:
    """(model input, recorded output) of every request of the prompt benchmarks, in file order."""
    pairs: list[tuple[str, str]] = []
    for name in PROMPT_BENCHMARKS:
        text = (folder / f"{name}.jsonl").read_text(encoding="utf-8")
        for line in text.split("\n"):  # newlines only: the texts hold other line separators
            if line.strip():
                row = json.loads(line)
                pairs.append((str(row["prompt"]), str(row["predict"])))
    return pairs


def recorded_lengths(pairs: Sequence[tuple[str, str]]) -> list[Recorded]:
    return [Recorded(len(p), len(out), out.find(EARLY_EXIT_STOP)) for p, out in pairs]


def write_lengths(path: Path, recorded: Sequence[Recorded]) -> None:
    """The derived lengths file: figures only, one request a line (no text of the data)."""
    head = {
        "about": (
            "Lengths (characters) derived from GuardReasoner-1B's recorded greedy outputs, "
            "predictions/1B of the shared GuardReasoner data, for bench.gpu.early_exit on "
            "machines without that folder. Regenerate: python -m bench.gpu.early_exit "
            "--write-lengths"
        ),
        "benchmarks": list(PROMPT_BENCHMARKS),
        "stop": EARLY_EXIT_STOP,
        "fields": ["input_chars", "output_chars", "stop_at"],
        "stop_at": "index of the stop string in the output, -1 where it does not occur",
    }
    lines = [json.dumps([r.input_chars, r.output_chars, r.stop_at]) for r in recorded]
    body = json.dumps(head, indent=2)[:-2] + ',\n  "requests": [\n    '
    path.write_text(body + ",\n    ".join(lines) + "\n  ]\n}\n", encoding="utf-8")


def read_lengths(path: Path) -> list[Recorded]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if data["stop"] != EARLY_EXIT_STOP:
        raise SystemExit(f"early_exit: {path} was made for stop {data['stop']!r}: regenerate it")
    return [Recorded(int(a), int(b), int(c)) for a, b, c in data["requests"]]


# ---- the workload ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """The requests: model inputs and each one's target new tokens per mode."""

    inputs: list[str]
    targets: dict[str, list[int]]
    about: dict[str, Any]


def make_workload(args: argparse.Namespace) -> Workload:
    folder = predictions_dir(args.predictions)
    if folder is not None:
        pairs = read_predictions(folder)
        recorded = recorded_lengths(pairs)
        inputs = [p for p, _ in pairs]
        about: dict[str, Any] = {
            "lengths_source": str(folder),
            "inputs_source": "the recorded model inputs",
        }
    else:
        recorded = read_lengths(LENGTHS_FILE)
        rng = random.Random(args.seed)
        frame = len(build_model_input("", None))
        inputs = [
            build_model_input(synthetic.text_of_length(rng, max(1, r.input_chars - frame)), None)
            for r in recorded
        ]
        about = {
            "lengths_source": str(LENGTHS_FILE.relative_to(REPO_ROOT)),
            "inputs_source": "random text of each recorded input's length (no shared folder)",
        }

    cap: int = args.max_new_tokens
    scale: float = args.length_scale

    def target(tokens: int) -> int:
        return max(1, min(cap, round(tokens * scale)))

    targets = {
        "full": [target(r.full_tokens) for r in recorded],
        "early_exit": [target(r.early_tokens) for r in recorded],
    }
    full = [r.full_tokens for r in recorded]
    early = [r.early_tokens for r in recorded]
    about.update(
        requests=len(recorded),
        benchmarks=list(PROMPT_BENCHMARKS),
        chars_per_token=CHARS_PER_TOKEN,
        length_scale=scale,
        max_new_tokens=cap,
        capped=sum(round(n * scale) > cap for n in full),
        without_stop=sum(r.stop_at < 0 for r in recorded),
        recorded_mean_full_tokens=sum(full) / len(full),
        recorded_mean_early_tokens=sum(early) / len(early),
        recorded_early_over_full=sum(early) / sum(full),
        mean_input_tokens_estimated=sum(r.input_chars for r in recorded)
        / len(recorded)
        / CHARS_PER_TOKEN,
        target_mean_tokens={m: sum(t) / len(t) for m, t in targets.items()},
    )
    return Workload(inputs, targets, about)


def plan_batches(
    requests: int, batch_sizes: Sequence[int], rounds: int, seed: int
) -> list[tuple[int, list[list[int]]]]:
    """For each batch size, `rounds` batches of request indices: consecutive slices of one
    shuffled order, wrapping around when the requests run out."""
    order = list(range(requests))
    random.Random(seed).shuffle(order)
    cursor = 0
    plan: list[tuple[int, list[list[int]]]] = []
    for batch in batch_sizes:
        batches: list[list[int]] = []
        for _ in range(rounds):
            batches.append([order[(cursor + k) % requests] for k in range(batch)])
            cursor += batch
        plan.append((batch, batches))
    return plan


class PinnedLengths(HfBackend):
    """`hf` with each row's output length pinned: input i of the next call ends after
    `targets[i]` new tokens (EOS must be ignored: `ignore_eos=True`)."""

    targets: list[int]

    def _row_limits(self, indices: Sequence[int]) -> list[int] | None:
        return [self.targets[i] for i in indices]


# ---- measuring -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    """One generate call of one batch (raw figures)."""

    seconds: float
    prefill_s: float
    steps: int  # the longest row's new tokens: the batch's forward passes
    tokens: int  # every row's own new tokens
    width: int  # padded input width (tokens)
    input_tokens: int  # every row's own input tokens
    stop_hits: int  # rows ended by the stop string itself
    errors: int
    peak_bytes: int | None


class Clock:
    """Wall time of a device's work: synchronizes CUDA around what it times."""

    def __init__(self, device: str) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        if self.device == "cuda":
            import torch

            return int(torch.cuda.max_memory_allocated())
        return None


async def timed_generate(
    backend: PinnedLengths,
    clock: Clock,
    inputs: list[str],
    targets: list[int],
    max_new_tokens: int,
    stop: list[str | None] | None,
) -> tuple[float, list[Any]]:
    backend.targets = targets
    clock.sync()
    clock.reset_peak()
    began = time.perf_counter()
    gens = await backend.generate(inputs, max_new_tokens, stop)
    clock.sync()
    return time.perf_counter() - began, gens


async def measure_batch(
    backend: PinnedLengths,
    clock: Clock,
    work: Workload,
    indices: list[int],
    modes: Sequence[str],
    max_new_tokens: int,
) -> dict[str, Run]:
    inputs = [work.inputs[i] for i in indices]
    lengths = [len(ids) for ids in backend._tokenizer(inputs)["input_ids"]]
    prefill_s = math.inf
    for _ in range(2):  # the shorter of two: the first call of a shape can pay for set-ups
        seconds, _ = await timed_generate(backend, clock, inputs, [1] * len(inputs), 1, None)
        prefill_s = min(prefill_s, seconds)
    runs: dict[str, Run] = {}
    for mode in modes:
        targets = [work.targets[mode][i] for i in indices]
        stop: list[str | None] | None = None
        if mode == "early_exit":
            stop = [EARLY_EXIT_STOP] * len(inputs)
        seconds, gens = await timed_generate(backend, clock, inputs, targets, max(targets), stop)
        ok = [g for g in gens if g.finish_reason != "error"]
        runs[mode] = Run(
            seconds=seconds,
            prefill_s=prefill_s,
            steps=max((g.tokens or 0 for g in ok), default=0),
            tokens=sum(g.tokens or 0 for g in ok),
            width=max(lengths),
            input_tokens=sum(lengths),
            stop_hits=sum(g.finish_reason == "stop" for g in ok),
            errors=len(gens) - len(ok),
            peak_bytes=clock.peak(),
        )
    return runs


@dataclass(frozen=True)
class Roof:
    """What the decode roofline needs."""

    weight_bytes: int
    kv_bytes_per_token: int
    bandwidth: float | None  # bytes/s

    def step_s(self, rows: int, width: int, steps: int) -> float | None:
        if self.bandwidth is None:
            return None
        context = width + steps / 2
        return (self.weight_bytes + rows * context * self.kv_bytes_per_token) / self.bandwidth


def summarize(batch: int, mode: str, runs: Sequence[Run], roof: Roof) -> dict[str, Any]:
    """One report row: the rounds of one batch size and mode, added up."""
    verdicts = batch * len(runs)
    seconds = sum(r.seconds for r in runs)
    prefill = sum(r.prefill_s for r in runs)
    tokens = sum(r.tokens for r in runs)
    steps = sum(r.steps for r in runs)
    decode_s = seconds - prefill
    # No decode figures where there was no decode step, or where noise ate the decode time.
    decode_steps = sum(max(0, r.steps - 1) for r in runs) if decode_s > 0 else 0
    row: dict[str, Any] = {
        "batch_size": batch,
        "mode": mode,
        "rounds": len(runs),
        "verdicts": verdicts,
        "errors": sum(r.errors for r in runs),
        "stop_string_hits": sum(r.stop_hits for r in runs),
        "seconds": seconds,
        "prefill_s": prefill,
        "decode_s": decode_s,
        "steps": steps,
        "tokens": tokens,
        "mean_tokens": tokens / verdicts,
        "input_width": max(r.width for r in runs),
        "mean_input_tokens": sum(r.input_tokens for r in runs) / verdicts,
        "useful_fraction": tokens / (batch * steps) if steps else None,
        "verdicts_per_s": verdicts / seconds,
        "tok_per_s": tokens / seconds,
        "decode_tok_per_s": (tokens - verdicts) / decode_s if decode_steps else None,
        "decode_step_ms": decode_s / decode_steps * 1000 if decode_steps else None,
        "row_steps_per_s": batch * decode_steps / decode_s if decode_steps else None,
        "peak_gib": max((r.peak_bytes or 0) for r in runs) / 2**30
        if any(r.peak_bytes for r in runs)
        else None,
    }
    roof_decode = 0.0
    for r in runs:
        step = roof.step_s(batch, r.width, r.steps)
        if step is None:
            roof_decode = math.nan
            break
        roof_decode += max(0, r.steps - 1) * step
    if math.isnan(roof_decode) or not decode_steps:
        row.update(
            roof_step_ms=None,
            roof_row_steps_per_s=None,
            roof_decode_tok_per_s=None,
            roof_verdicts_per_s=None,
            roof_fraction=None,
        )
    else:
        row.update(
            roof_step_ms=roof_decode / decode_steps * 1000,
            roof_row_steps_per_s=batch * decode_steps / roof_decode,
            roof_decode_tok_per_s=(tokens - verdicts) / roof_decode,
            roof_verdicts_per_s=verdicts / (prefill + roof_decode),
            roof_fraction=roof_decode / decode_s,
        )
    return row


def compare(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Early exit against full, per batch size measured both ways."""
    by = {(r["batch_size"], r["mode"]): r for r in rows}
    out: list[dict[str, Any]] = []
    for (batch, mode), early in by.items():
        full = by.get((batch, "full"))
        if mode != "early_exit" or full is None:
            continue
        out.append(
            {
                "batch_size": batch,
                "verdicts_per_s_full": full["verdicts_per_s"],
                "verdicts_per_s_early_exit": early["verdicts_per_s"],
                "verdicts_speedup": early["verdicts_per_s"] / full["verdicts_per_s"],
                "steps_full": full["steps"],
                "steps_early_exit": early["steps"],
                "tokens_full": full["tokens"],
                "tokens_early_exit": early["tokens"],
                "decode_step_ms_full": full["decode_step_ms"],
                "decode_step_ms_early_exit": early["decode_step_ms"],
            }
        )
    return out


# ---- the run ---------------------------------------------------------------------------------


def default_json() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / JSON_NAME if out else Path(JSON_NAME)


def write_report(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2), encoding="utf-8")
    tmp.replace(path)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def progress(began: float, row: dict[str, Any]) -> None:
    print(
        f"[{time.perf_counter() - began:6.1f} s] batch {row['batch_size']:>3} "
        f"{row['mode']:<10} {row['seconds']:7.2f} s  {row['verdicts_per_s']:8.2f} verdicts/s  "
        f"{row['tok_per_s']:9.0f} tok/s  steps {row['steps']:>5}  "
        f"step {_fmt(row['decode_step_ms'], '.2f')} ms (roofline "
        f"{_fmt(row['roof_step_ms'], '.2f')} ms)",
        flush=True,
    )


async def run_all(
    backend: PinnedLengths,
    work: Workload,
    args: argparse.Namespace,
    report: dict[str, Any],
    roof: Roof,
    began: float,
) -> None:
    clock = Clock(backend.device)
    load = time.perf_counter()
    await backend.start()
    report["load_s"] = time.perf_counter() - load
    try:
        warm = work.inputs[: min(8, len(work.inputs))]
        stops: list[str | None] = [EARLY_EXIT_STOP] * len(warm)
        await timed_generate(backend, clock, warm, [8] * len(warm), 8, stops)
        step_s: float | None = None  # the last decode step measured, for the time estimate
        prefill_per_row: float | None = None
        plan = plan_batches(len(work.inputs), args.batch_sizes, args.rounds, args.seed)
        for batch, rounds in plan:
            estimate = 0.0
            if step_s is not None and prefill_per_row is not None:
                for indices in rounds:
                    steps = sum(max(work.targets[m][i] for i in indices) for m in MODES)
                    estimate += 1.5 * step_s * steps + 3 * prefill_per_row * batch
            elapsed = time.perf_counter() - began
            if elapsed + estimate > args.deadline_s:
                report["skipped"].append(
                    {
                        "batch_size": batch,
                        "reason": f"time: {elapsed:.0f} s gone, ~{estimate:.0f} s more needed, "
                        f"deadline {args.deadline_s:.0f} s",
                    }
                )
                write_report(report, args.json)
                continue
            results: dict[str, list[Run]] = {m: [] for m in MODES}
            for indices in rounds:
                runs = await measure_batch(
                    backend, clock, work, indices, MODES, args.max_new_tokens
                )
                for mode, one in runs.items():
                    results[mode].append(one)
            for mode in MODES:
                row = summarize(batch, mode, results[mode], roof)
                report["rows"].append(row)
                progress(began, row)
                if row["decode_step_ms"] is not None:
                    step_s = row["decode_step_ms"] / 1000
                prefill_per_row = row["prefill_s"] / row["verdicts"]
            report["comparison"] = compare(report["rows"])
            report["elapsed_s"] = time.perf_counter() - began
            write_report(report, args.json)
    finally:
        await backend.close()


def print_table(report: dict[str, Any]) -> None:
    head = (
        f"{'batch':>5} {'verdicts/s full':>16} {'early exit':>11} {'x':>6} "
        f"{'tok/s full':>11} {'early':>9} {'step ms':>8} {'roofline':>9} {'roof v/s early':>15}"
    )
    print(head)
    print("-" * len(head))
    by = {(r["batch_size"], r["mode"]): r for r in report["rows"]}
    for c in report["comparison"]:
        full, early = by[(c["batch_size"], "full")], by[(c["batch_size"], "early_exit")]
        print(
            f"{c['batch_size']:>5} {full['verdicts_per_s']:>16.2f} "
            f"{early['verdicts_per_s']:>11.2f} {c['verdicts_speedup']:>6.2f} "
            f"{full['tok_per_s']:>11.0f} {early['tok_per_s']:>9.0f} "
            f"{_fmt(full['decode_step_ms'], '.2f'):>8} {_fmt(full['roof_step_ms'], '.2f'):>9} "
            f"{_fmt(early['roof_verdicts_per_s'], '.1f'):>15}"
        )
    for s in report["skipped"]:
        print(f"skipped batch {s['batch_size']}: {s['reason']}")
    bw = report["bandwidth_gb_s"]
    print(
        f"{report['model']} {report['dtype']} on {report['device']}: weights "
        f"{report['weight_bytes'] / 1e9:.2f} GB, KV {report['kv_bytes_per_token']} B/token, "
        f"bandwidth {_fmt(bw, '.0f')} GB/s ({report['bandwidth_source']}); "
        f"{report['elapsed_s']:.0f} s in all; report: {report['json']}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu.early_exit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny model on CPU, batch sizes 1,2,4, lengths / 16 (a smoke run)",
    )
    p.add_argument("--json", type=Path, help=f"the report (default: $OUT/{JSON_NAME}, else ./)")
    p.add_argument(
        "--batch-sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        help="default 1,2,4,...,256 (--quick: 1,2,4)",
    )
    p.add_argument("--rounds", type=int, default=1, help="batches per batch size (default 1)")
    p.add_argument("--max-new-tokens", type=int, help="length cap (default 1024; --quick 48)")
    p.add_argument(
        "--length-scale", type=float, help="recorded lengths x this (default 1; --quick 1/16)"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto (--quick: cpu)")
    p.add_argument(
        "--bandwidth-gb-s",
        type=float,
        help="memory bandwidth for the roofline (default: measured on CUDA)",
    )
    p.add_argument(
        "--deadline-s",
        type=float,
        help="skip batch sizes that would end past this many seconds (default 450)",
    )
    p.add_argument(
        "--predictions",
        type=Path,
        help="the shared predictions/1B folder (default: found next to the repo)",
    )
    p.add_argument("--workdir", type=Path, help="where the random model goes (default: temp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--write-lengths",
        action="store_true",
        help=f"regenerate {LENGTHS_FILE.name} from the shared folder and exit",
    )
    args = p.parse_args(argv)
    quick = args.quick
    args.batch_sizes = args.batch_sizes or (QUICK_BATCH_SIZES if quick else FULL_BATCH_SIZES)
    args.max_new_tokens = args.max_new_tokens or (48 if quick else 1024)
    args.length_scale = args.length_scale or (1 / 16 if quick else 1.0)
    args.device = args.device or ("cpu" if quick else "auto")
    args.deadline_s = args.deadline_s or (120.0 if quick else 450.0)
    args.json = args.json or default_json()
    if min(args.batch_sizes) < 1 or args.rounds < 1 or args.max_new_tokens < 2:
        p.error("batch sizes and --rounds must be positive, --max-new-tokens at least 2")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.write_lengths:
        folder = predictions_dir(args.predictions)
        if folder is None:
            raise SystemExit("early_exit: the shared predictions/1B folder is not there")
        write_lengths(LENGTHS_FILE, recorded_lengths(read_predictions(folder)))
        print(f"wrote {LENGTHS_FILE}")
        return {}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never a hub request (no network on GPU nodes)
    began = time.perf_counter()
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise SystemExit("early_exit: --device cuda, but torch sees no CUDA device")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and cuda) else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    shape = synthetic.TINY if args.quick else synthetic.LLAMA_3_2_1B
    work = make_workload(args)
    report: dict[str, Any] = {
        "bench": "bench.gpu.early_exit",
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "quick": args.quick,
        "json": str(args.json),
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": "random-tiny" if args.quick else "random-llama-3.2-1b (GuardReasoner-1B shape)",
        "shape": shape,
        "dtype": dtype,
        "method": METHOD,
        "workload": work.about,
        "batch_sizes": args.batch_sizes,
        "rounds": args.rounds,
        "seed": args.seed,
        "rows": [],
        "comparison": [],
        "skipped": [],
        "elapsed_s": 0.0,
    }
    with tempfile.TemporaryDirectory(prefix="gpu-early-exit-", dir=args.workdir) as tmp:
        name = "tiny" if args.quick else "Llama-3.2-1B-shaped"
        print(f"building a random {name} model ({device}, {dtype}) in {tmp}", flush=True)
        built = synthetic.build_random_llama(
            Path(tmp) / "model", shape, device=device, dtype=dtype, seed=args.seed
        )
        info = model_shape(built.path)
        element = torch.finfo(getattr(torch, dtype)).bits // 8
        if args.bandwidth_gb_s is not None:
            bandwidth: float | None = args.bandwidth_gb_s * 1e9
            source = "given (--bandwidth-gb-s)"
        else:
            bandwidth = measure_bandwidth(device)
            source = (
                "measured: device-to-device copy, bytes read + written"
                if bandwidth
                else ("none off CUDA (give --bandwidth-gb-s)")
            )
        backend = PinnedLengths(
            built.path,
            device=device,  # type: ignore[arg-type]
            dtype=dtype,  # type: ignore[arg-type]
            max_batch_size=max(args.batch_sizes),
            ignore_eos=True,
        )
        roof = Roof(
            weight_bytes=built.parameters * element,
            kv_bytes_per_token=info["kv_values_per_token"] * element,
            bandwidth=bandwidth,
        )
        report.update(
            parameters=built.parameters,
            weight_bytes=roof.weight_bytes,
            kv_bytes_per_token=roof.kv_bytes_per_token,
            bandwidth_gb_s=bandwidth / 1e9 if bandwidth else None,
            bandwidth_source=source,
            build_s=built.seconds,
        )
        write_report(report, args.json)
        asyncio.run(run_all(backend, work, args, report, roof, began))
    report["elapsed_s"] = time.perf_counter() - began
    report["complete"] = not report["skipped"]
    write_report(report, args.json)
    print_table(report)
    return report


if __name__ == "__main__":
    main()
