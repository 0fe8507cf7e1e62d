"""`guardstream engine build`: compile a checkpoint into a TensorRT engine (engine/trtllm_build).

Needs a CUDA GPU (the engine only runs on the GPU model it is built on) and tensorrt_llm
1.0-1.2.x (`pip install 'guardstream[trtllm]'` or NVIDIA's release container); on 1.3 and later
there is no engine path and the `trtllm` backend's PyTorch runtime is the way to serve.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.trtllm_build import DTYPES, QUANTIZATIONS, build_engine
from engine.trtllm_manifest import BuildSettings, TrtllmSetupError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("engine", help="TensorRT-LLM engines")
    esub = p.add_subparsers(dest="engine_cmd", required=True)
    b = esub.add_parser(
        "build",
        help="compile a Hugging Face checkpoint into a TensorRT engine (tensorrt_llm 1.0-1.2.x)",
    )
    b.add_argument("--checkpoint", type=Path, required=True, help="Hugging Face checkpoint dir")
    b.add_argument("--output", type=Path, required=True, help="engine dir (new or empty)")
    b.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    b.add_argument("--quantization", choices=QUANTIZATIONS, default="none")
    b.add_argument(
        "--calib-dataset",
        default=None,
        help="local calibration dataset, required for fp8 (the default one is a hub dataset)",
    )
    b.add_argument("--max-batch-size", type=int, default=64)
    b.add_argument("--max-num-tokens", type=int, default=8192)
    b.add_argument("--max-seq-len", type=int, default=4096, help="prompt + generated tokens")
    b.add_argument(
        "--max-input-len", type=int, default=None, help="longest prompt (default: --max-seq-len)"
    )
    b.add_argument("--tp", type=int, default=1, help="tensor-parallel size (GPUs)")
    b.add_argument("--force", action="store_true", help="build into a non-empty --output")
    b.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    settings = BuildSettings(
        dtype=args.dtype,
        quantization=args.quantization,
        max_batch_size=args.max_batch_size,
        max_num_tokens=args.max_num_tokens,
        max_seq_len=args.max_seq_len,
        max_input_len=args.max_input_len,
        tensor_parallel_size=args.tp,
        calib_dataset=args.calib_dataset,
    )
    try:
        built = build_engine(args.checkpoint, args.output, settings, overwrite=args.force)
    except TrtllmSetupError as exc:
        print(f"guardstream engine build: {exc}", file=sys.stderr)
        return 2
    shutdown = getattr(built.llm, "shutdown", None)
    if callable(shutdown):
        shutdown()
    m = built.manifest
    print(f"engine written to {args.output}")
    print(
        f"manifest {built.manifest_path}: model {m.model_id}, tensorrt_llm "
        f"{m.tensorrt_llm_version}, GPU {m.gpu_name}"
    )
    return 0
