"""Compile a GuardReasoner checkpoint into a TensorRT-LLM engine and record its manifest.

Uses TensorRT-LLM's Python API of the compiled-engine path (tensorrt_llm 1.0-1.2.x):
`tensorrt_llm._tensorrt_engine.LLM(model=<checkpoint>, dtype=..., tensor_parallel_size=...,
build_config=BuildConfig(max_batch_size, max_input_len, max_seq_len, max_num_tokens),
quant_config=QuantConfig(quant_algo, kv_cache_quant_algo), calib_config=CalibConfig(
calib_dataset))` builds in its constructor; `llm.save(dir)` writes the engine and tokenizer.

FP8 needs calibration. TensorRT-LLM's default calibration set is the hub dataset
`cnn_dailymail`, which cannot be fetched offline (and is the wrong domain for a guard model), so
`--quantization fp8` is refused unless `--calib-dataset PATH` names a local dataset.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from engine.trtllm_manifest import (
    MANIFEST_NAME,
    BuildSettings,
    EngineManifest,
    TrtllmSetupError,
    checkpoint_checksum,
    checkpoint_model_id,
    detect_gpu_name,
    engine_path_removed_message,
    engine_path_supported,
    import_tensorrt_llm,
    installed_version,
    read_checkpoint_config,
)

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float16")
QUANTIZATIONS = ("none", "fp8")


@dataclass(slots=True)
class BuiltEngine:
    manifest: EngineManifest
    manifest_path: Path
    #: The engine-path `LLM` that did the build, still loaded (shut it down or keep serving).
    llm: Any


def validate_settings(checkpoint: Path, output: Path, settings: BuildSettings) -> None:
    """Refuse bad options before touching the GPU; every message names the option."""
    if settings.dtype not in DTYPES:
        raise TrtllmSetupError(f"--dtype must be one of {DTYPES}, got {settings.dtype!r}")
    if settings.quantization not in QUANTIZATIONS:
        raise TrtllmSetupError(
            f"--quantization must be one of {QUANTIZATIONS}, got {settings.quantization!r}"
        )
    for name in ("max_batch_size", "max_num_tokens", "max_seq_len", "tensor_parallel_size"):
        if getattr(settings, name) < 1:
            raise TrtllmSetupError(f"--{name.replace('_', '-')} must be >= 1")
    if not 1 <= settings.input_len <= settings.max_seq_len:
        raise TrtllmSetupError(
            f"--max-input-len ({settings.input_len}) must be between 1 and --max-seq-len "
            f"({settings.max_seq_len})"
        )
    if settings.quantization == "fp8":
        if not settings.calib_dataset:
            raise TrtllmSetupError(
                "--quantization fp8 needs --calib-dataset PATH: TensorRT-LLM's default "
                "calibration set is the hub dataset 'cnn_dailymail', which is not fetched "
                "offline; give a local dataset (e.g. recorded guard prompts)"
            )
        if not Path(settings.calib_dataset).exists():
            raise TrtllmSetupError(f"--calib-dataset {settings.calib_dataset} does not exist")
    elif settings.calib_dataset:
        raise TrtllmSetupError("--calib-dataset only applies to --quantization fp8")
    if not checkpoint.is_dir():
        raise TrtllmSetupError(f"--checkpoint {checkpoint} is not a directory")
    read_checkpoint_config(checkpoint)
    if output.resolve() == checkpoint.resolve():
        raise TrtllmSetupError("--output must differ from --checkpoint")


def prepare_output(output: Path, *, overwrite: bool) -> None:
    """The output folder must be new or empty, unless `overwrite` (then its old manifest goes
    first, so an interrupted build never leaves a valid-looking engine behind)."""
    if output.exists() and not output.is_dir():
        raise TrtllmSetupError(f"--output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise TrtllmSetupError(
                f"--output {output} is not empty; choose an empty folder or pass --force"
            )
        (output / MANIFEST_NAME).unlink(missing_ok=True)
    output.mkdir(parents=True, exist_ok=True)


def require_engine_toolchain() -> tuple[ModuleType, ModuleType, str, str]:
    """tensorrt_llm (engine path available), its `_tensorrt_engine`, its version, the GPU."""
    trtllm = import_tensorrt_llm()
    version = installed_version(trtllm)
    if not engine_path_supported(version):
        raise TrtllmSetupError(engine_path_removed_message(version))
    try:
        engine_mod = importlib.import_module("tensorrt_llm._tensorrt_engine")
    except ImportError as exc:
        raise TrtllmSetupError(engine_path_removed_message(version)) from exc
    gpu = detect_gpu_name()
    if gpu is None:
        raise TrtllmSetupError(
            "no CUDA GPU is visible (neither torch.cuda nor nvidia-smi found one): TensorRT "
            "engines are compiled for, and only run on, the GPU model they are built on"
        )
    return trtllm, engine_mod, version, gpu


def build_llm_kwargs(llmapi: ModuleType, settings: BuildSettings) -> dict[str, Any]:
    """Keyword arguments of `_tensorrt_engine.LLM` for these settings (documented names)."""
    kwargs: dict[str, Any] = {
        "dtype": settings.dtype,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "build_config": llmapi.BuildConfig(
            max_batch_size=settings.max_batch_size,
            max_input_len=settings.input_len,
            max_seq_len=settings.max_seq_len,
            max_num_tokens=settings.max_num_tokens,
        ),
    }
    if settings.quantization == "fp8":
        kwargs["quant_config"] = llmapi.QuantConfig(
            quant_algo=llmapi.QuantAlgo.FP8, kv_cache_quant_algo=llmapi.QuantAlgo.FP8
        )
        kwargs["calib_config"] = llmapi.CalibConfig(calib_dataset=settings.calib_dataset)
    return kwargs


def build_engine(
    checkpoint: Path,
    output: Path,
    settings: BuildSettings,
    *,
    overwrite: bool = False,
    runtime_kwargs: Mapping[str, Any] | None = None,
) -> BuiltEngine:
    """Build, save and describe an engine. Blocks for minutes: call it off the event loop.

    `runtime_kwargs` (e.g. `kv_cache_config`) are passed to the same `LLM` so that a caller who
    serves right after building (the backend's build_on_start) does not load the engine twice.
    """
    validate_settings(checkpoint, output, settings)
    _, engine_mod, version, gpu = require_engine_toolchain()
    llmapi = importlib.import_module("tensorrt_llm.llmapi")
    prepare_output(output, overwrite=overwrite)
    kwargs = build_llm_kwargs(llmapi, settings)
    for key, value in (runtime_kwargs or {}).items():
        kwargs.setdefault(key, value)  # the build settings win over runtime wishes
    log.info("building a TensorRT engine from %s into %s (%s)", checkpoint, output, settings)
    llm = engine_mod.LLM(model=str(checkpoint), **kwargs)
    try:
        llm.save(str(output))
        manifest = EngineManifest(
            model_id=checkpoint_model_id(checkpoint),
            checkpoint=str(checkpoint.resolve()),
            checkpoint_checksum=checkpoint_checksum(checkpoint),
            tensorrt_llm_version=version,
            gpu_name=gpu,
            build=settings,
            built_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        path = manifest.write(output)
    except BaseException:
        shutdown = getattr(llm, "shutdown", None)
        if callable(shutdown):
            shutdown()
        raise
    return BuiltEngine(manifest=manifest, manifest_path=path, llm=llm)
