"""Generation throughput and latency of the model backends on one machine (made for a GPU).

    python -m bench.gpu.throughput                       # GuardReasoner-1B-shaped, random weights
    python -m bench.gpu.throughput --model DIR           # a real local checkpoint
    python -m bench.gpu.throughput --tiny --device cpu --batch-sizes 1,2 --new-tokens 8

For each backend (`hf`; `trtllm` where tensorrt_llm imports) and batch size, it sends `--rounds`
batches of GuardReasoner-shaped inputs through `Backend.generate` with the output length pinned
(`--new-tokens`, EOS ignored: GuardReasoner writes ~280 tokens) and reports messages/s,
generated tokens/s, and p50/p95/p99 of the batch latency and of the per-message share of it
(batch latency / batch size). Through the Backend protocol a message's own latency is its
batch's latency. For comparison it prints the decode roofline: one decode step must read every
weight once, so weight bytes / measured memory bandwidth is the shortest step, and
batch size / step time the most tokens/s any backend can reach (a second figure adds the KV
cache a step reads at the mean context length).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.gpu import synthetic
from bench.gpu.roofline import measure_bandwidth, model_shape, roofline


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    data = sorted(values)
    if not data:
        return math.nan
    pos = (len(data) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


async def run_backend(
    backend: Any, inputs: list[str], args: argparse.Namespace, bar: Any
) -> list[dict[str, Any]]:
    await backend.start()
    try:
        await backend.generate(inputs[: min(args.batch_sizes)], min(8, args.new_tokens))  # warm
        rows: list[dict[str, Any]] = []
        cursor = 0
        for b in args.batch_sizes:
            latencies: list[float] = []
            tokens = errors = 0
            for _ in range(args.rounds):
                batch = [inputs[(cursor + k) % len(inputs)] for k in range(b)]
                cursor += b
                began = time.perf_counter()
                gens = await backend.generate(batch, args.new_tokens)
                latencies.append(time.perf_counter() - began)
                tokens += sum(g.tokens or 0 for g in gens if g.finish_reason != "error")
                errors += sum(g.finish_reason == "error" for g in gens)
                bar.update(1)
                bar.set_postfix_str(f"{backend.name} b={b} {b / latencies[-1]:.1f} msg/s")
            total = sum(latencies)
            share = [s / b for s in latencies]
            rows.append(
                {
                    "backend": backend.name,
                    "batch_size": b,
                    "messages": b * args.rounds,
                    "errors": errors,
                    "seconds": total,
                    "msgs_per_s": b * args.rounds / total,
                    "tok_per_s": tokens / total,
                    "generated_tokens": tokens,
                    **{f"batch_p{q}_s": percentile(latencies, q) for q in (50, 95, 99)},
                    **{f"msg_p{q}_ms": percentile(share, q) * 1000 for q in (50, 95, 99)},
                }
            )
        return rows
    finally:
        await backend.close()


def make_backends(
    args: argparse.Namespace, model_dir: Path
) -> tuple[list[Any], list[dict[str, str]]]:
    backends: list[Any] = []
    skipped: list[dict[str, str]] = []
    wanted = args.backends
    if "hf" in wanted:
        from engine.backends.hf import HfBackend

        backends.append(
            HfBackend(
                model_dir,
                device=args.device,
                dtype=args.dtype,
                max_batch_size=max(args.batch_sizes),
                ignore_eos=True,
            )
        )
    if "trtllm" in wanted:
        try:
            import tensorrt_llm  # noqa: F401

            from engine.backends.trtllm import TrtllmBackend
        except Exception as exc:
            skipped.append({"backend": "trtllm", "reason": f"not importable: {exc!r}"})
        else:
            backend = TrtllmBackend(
                model_dir.name,
                "bench",
                checkpoint_dir=model_dir,
                engine_dir=args.trtllm_engine_dir,
                runtime=args.trtllm_runtime,
                build_on_start=args.trtllm_engine_dir is not None,
                max_batch_size=max(args.batch_sizes),
            )
            _pin_trtllm_length(backend)
            backends.append(backend)
    return backends, skipped


def _pin_trtllm_length(backend: Any) -> None:
    """TrtllmBackend has no ignore_eos setting (yet): set it on the SamplingParams it makes."""
    make = backend._sampling_params

    def pinned(max_new_tokens: int) -> Any:
        params = make(max_new_tokens)
        params.ignore_eos = True
        return params

    backend._sampling_params = pinned


def print_table(report: dict[str, Any]) -> None:
    head = (
        f"{'backend':<8}{'batch':>6}{'msgs/s':>9}{'tok/s':>10}{'p50 s':>8}{'p95 s':>8}"
        f"{'p99 s':>8}{'ms/msg p50':>11}{'p95':>8}{'p99':>8}{'roof tok/s':>12}{'+KV':>10}"
    )
    print(head)
    print("-" * len(head))

    def fmt(value: float | None, width: int, spec: str) -> str:
        return f"{'n/a':>{width}}" if value is None else f"{value:>{width}{spec}}"

    for r in report["rows"]:
        print(
            f"{r['backend']:<8}{r['batch_size']:>6}{r['msgs_per_s']:>9.2f}{r['tok_per_s']:>10.0f}"
            f"{r['batch_p50_s']:>8.3f}{r['batch_p95_s']:>8.3f}{r['batch_p99_s']:>8.3f}"
            f"{r['msg_p50_ms']:>11.1f}{r['msg_p95_ms']:>8.1f}{r['msg_p99_ms']:>8.1f}"
            f"{fmt(r['roof_tok_s'], 12, '.0f')}{fmt(r['roof_kv_tok_s'], 10, '.0f')}"
        )
    for s in report["skipped"]:
        print(f"skipped {s['backend']}: {s['reason']}")
    bw = report["bandwidth_gb_s"]
    step = report["roof_step_ms"]
    print(
        f"weights {report['weight_bytes'] / 1e6:.1f} MB, bandwidth "
        + (f"{bw:.0f} GB/s, shortest decode step {step:.3f} ms" if bw else "n/a (not CUDA)")
        + f"; {report['new_tokens']} new tokens/message, mean input {report['input_tokens']:.0f}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", type=Path, help="a local checkpoint folder (default: random 1B)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model (CPU smoke run)")
    p.add_argument("--backends", default="hf,trtllm", type=lambda s: s.split(","))
    p.add_argument("--batch-sizes", default=[1, 8, 32, 64, 128, 256],
                   type=lambda s: [int(x) for x in s.split(",")])  # fmt: skip
    p.add_argument("--new-tokens", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3, help="batches per batch size")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto")
    p.add_argument("--trtllm-runtime", choices=["pytorch", "engine"], default="pytorch")
    p.add_argument("--trtllm-engine-dir", type=Path, help="engine folder (built if absent)")
    p.add_argument("--workdir", type=Path, help="where the random model goes (default: temp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.new_tokens < 1 or args.rounds < 1:
        p.error("batch sizes, --new-tokens and --rounds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch
    import transformers
    from tqdm import tqdm

    device = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    with tempfile.TemporaryDirectory(prefix="gpu-bench-", dir=args.workdir) as tmp:
        model_dir, built = args.model, None
        if model_dir is None:
            shape = synthetic.TINY if args.tiny else synthetic.LLAMA_3_2_1B
            print(f"building a random {'tiny' if args.tiny else 'Llama-3.2-1B'} model in {tmp}")
            built = synthetic.build_random_llama(Path(tmp) / "model", shape, device=device,
                                                 dtype=dtype, seed=args.seed)  # fmt: skip
            model_dir = built.path
        inputs = synthetic.guard_inputs(max(256, max(args.batch_sizes)), seed=args.seed)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        input_tokens = sum(len(ids) for ids in tok(inputs)["input_ids"]) / len(inputs)
        shape_info = model_shape(model_dir)
        dtype_bytes = torch.finfo(getattr(torch, dtype)).bits // 8
        weight_bytes = shape_info["parameters"] * dtype_bytes
        kv_bytes = shape_info["kv_values_per_token"] * dtype_bytes
        bandwidth = measure_bandwidth(device)
        context = input_tokens + args.new_tokens / 2
        backends, skipped = make_backends(args, model_dir)
        rows: list[dict[str, Any]] = []
        total = len(backends) * len(args.batch_sizes) * args.rounds
        with tqdm(total=total, unit="batch", file=sys.stderr) as bar:
            for backend in backends:
                try:
                    got = asyncio.run(run_backend(backend, inputs, args, bar))
                except Exception as exc:
                    skipped.append({"backend": backend.name, "reason": f"failed: {exc!r}"})
                    continue
                for row in got:
                    row.update(
                        roofline(weight_bytes, kv_bytes, context, bandwidth, row["batch_size"])
                    )
                rows.extend(got)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": str(args.model)
        if args.model
        else ("random-tiny" if args.tiny else "random-llama-3.2-1b"),
        "parameters": shape_info["parameters"],
        "dtype": dtype,
        "weight_bytes": weight_bytes,
        "build_s": built.seconds if built else None,
        "bandwidth_gb_s": bandwidth / 1e9 if bandwidth else None,
        "roof_step_ms": weight_bytes / bandwidth * 1000 if bandwidth else None,
        "new_tokens": args.new_tokens,
        "input_tokens": input_tokens,
        "rounds": args.rounds,
        "rows": rows,
        "skipped": skipped,
    }
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
