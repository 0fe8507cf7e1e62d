"""What a compiled TensorRT-LLM engine was built from, and whether it still fits this machine.

A TensorRT engine only runs on the tensorrt_llm version and the GPU model it was compiled with,
and it silently goes stale when the checkpoint changes. `guardstream engine build` therefore
writes `guardstream-engine.json` next to the engine; the `trtllm` backend reads it at start and
refuses an engine that does not match, printing the exact command that rebuilds it.

The checkpoint checksum is deliberately cheap: SHA-256 over the bytes of `config.json` and the
names and sizes of the weight files (`*.safetensors`, `*.bin`, `*.pt`, `*.pth`, `*.index.json`),
never their contents. It catches another model, another shard layout or a re-saved checkpoint of
another size; it does not catch an in-place edit that keeps every size.

Version rule: the engine path needs tensorrt_llm >= 1.0 and < 1.3; 1.3 removed
`tensorrt_llm._tensorrt_engine`. The PyTorch runtime (`tensorrt_llm.LLM` on the checkpoint) runs
on any 1.x.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

MANIFEST_NAME = "guardstream-engine.json"
MANIFEST_FORMAT = 1
#: First tensorrt_llm release without the compiled-engine path.
ENGINE_PATH_REMOVED_IN = (1, 3)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class TrtllmSetupError(RuntimeError):
    """TensorRT-LLM, the GPU or the engine is not what the service needs; the message says how
    to fix it."""


def import_tensorrt_llm() -> ModuleType:
    """Import tensorrt_llm or explain how to get it."""
    try:
        return importlib.import_module("tensorrt_llm")
    except ImportError as exc:
        raise TrtllmSetupError(
            "tensorrt_llm is not installed (or failed to import: "
            f"{exc}). Install the extra with `pip install 'guardstream[trtllm]'` (NVIDIA ships "
            "wheels for CPython 3.10 and 3.12 only), or run inside NVIDIA's TensorRT-LLM "
            "release container (nvcr.io/nvidia/tensorrt-llm/release) of a 1.0-1.2.x version."
        ) from exc


def parse_version(text: str) -> tuple[int, int, int]:
    """`"1.2.0rc5"` -> `(1, 2, 0)`: the release triple, pre-release tags ignored."""
    match = re.match(r"\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", text)
    if match is None:
        raise TrtllmSetupError(f"cannot read the tensorrt_llm version {text!r}")
    major, minor, patch = (int(part) if part else 0 for part in match.groups())
    return major, minor, patch


def installed_version(trtllm: ModuleType) -> str:
    return str(getattr(trtllm, "__version__", "unknown"))


def engine_path_supported(version: str) -> bool:
    return parse_version(version)[:2] < ENGINE_PATH_REMOVED_IN


def engine_path_removed_message(version: str) -> str:
    return (
        f"tensorrt_llm {version} has no compiled-engine path (removed in 1.3: "
        "tensorrt_llm._tensorrt_engine and trtllm-build are gone). Build and run engines with "
        "tensorrt_llm 1.0-1.2.x (or NVIDIA's release container of that version), or use the "
        "PyTorch runtime instead, which loads the Hugging Face checkpoint directly: "
        "GUARDSTREAM_TRTLLM_RUNTIME=pytorch (TrtllmBackend(runtime='pytorch'))."
    )


def detect_gpu_name() -> str | None:
    """Name of CUDA device 0 (torch if importable, else nvidia-smi); None when there is none."""
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        torch = None
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return str(torch.cuda.get_device_name(0))
        except (RuntimeError, AssertionError, AttributeError):
            pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run(  # noqa: S603 - fixed argv, binary resolved from PATH
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = done.stdout.strip().splitlines()[:1] if done.returncode == 0 else []
    return first[0].strip() if first and first[0].strip() else None


def read_checkpoint_config(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / "config.json"
    if not path.is_file():
        raise TrtllmSetupError(
            f"{checkpoint} is not a Hugging Face checkpoint: {path.name} is missing"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise TrtllmSetupError(f"{path} does not hold a JSON object")
    return data


def checkpoint_model_id(checkpoint: Path) -> str:
    """`_name_or_path` from the checkpoint's config.json, else the folder's name."""
    name = read_checkpoint_config(checkpoint).get("_name_or_path")
    if isinstance(name, str) and name.strip():
        return name.strip()
    return checkpoint.resolve().name


def checkpoint_checksum(checkpoint: Path) -> str:
    """Cheap fingerprint of a checkpoint (see the module docstring for what it covers)."""
    digest = hashlib.sha256()
    digest.update((checkpoint / "config.json").read_bytes())
    for path in sorted(checkpoint.iterdir(), key=lambda p: p.name):
        if path.is_file() and (path.suffix in WEIGHT_SUFFIXES or path.name.endswith(".index.json")):
            digest.update(f"\n{path.name}\0{path.stat().st_size}".encode())
    return "sha256:" + digest.hexdigest()


@dataclass(frozen=True, slots=True)
class BuildSettings:
    """The options of `guardstream engine build`, as recorded in the manifest."""

    dtype: str = "bfloat16"
    quantization: str = "none"
    max_batch_size: int = 64
    max_num_tokens: int = 8192
    max_seq_len: int = 4096
    max_input_len: int | None = None
    tensor_parallel_size: int = 1
    calib_dataset: str | None = None

    @property
    def input_len(self) -> int:
        """max_input_len, defaulting to max_seq_len (TensorRT-LLM's own default, 1024, is too
        small for chat transcripts)."""
        return self.max_input_len if self.max_input_len is not None else self.max_seq_len


def rebuild_command(checkpoint: Path | str, output: Path | str, settings: BuildSettings) -> str:
    """The exact `guardstream engine build ...` line that produces an engine with `settings`."""
    argv = [
        "guardstream", "engine", "build",
        "--checkpoint", str(checkpoint),
        "--output", str(output),
        "--dtype", settings.dtype,
        "--quantization", settings.quantization,
        "--max-batch-size", str(settings.max_batch_size),
        "--max-num-tokens", str(settings.max_num_tokens),
        "--max-seq-len", str(settings.max_seq_len),
        "--max-input-len", str(settings.input_len),
        "--tp", str(settings.tensor_parallel_size),
    ]  # fmt: skip
    if settings.calib_dataset:
        argv += ["--calib-dataset", settings.calib_dataset]
    return shlex.join(argv)


@dataclass(frozen=True, slots=True)
class EngineManifest:
    """Contents of `guardstream-engine.json`."""

    model_id: str
    checkpoint: str
    checkpoint_checksum: str
    tensorrt_llm_version: str
    gpu_name: str
    build: BuildSettings
    built_at: str
    format: int = field(default=MANIFEST_FORMAT)

    def write(self, engine_dir: Path) -> Path:
        path = engine_dir / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n", "utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, engine_dir: Path) -> EngineManifest | None:
        path = engine_dir / MANIFEST_NAME
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            build = BuildSettings(**raw.pop("build"))
            return cls(build=build, **raw)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise TrtllmSetupError(f"{path} is not a valid engine manifest: {exc}") from exc


def manifest_mismatches(
    manifest: EngineManifest,
    *,
    version: str,
    gpu_name: str | None,
    checkpoint: Path | None,
) -> list[str]:
    """What differs between the engine's manifest and this machine (empty: it fits)."""
    problems: list[str] = []
    if manifest.tensorrt_llm_version != version:
        problems.append(
            f"built with tensorrt_llm {manifest.tensorrt_llm_version}, installed is {version}"
        )
    if gpu_name is None:
        problems.append(f"built for GPU {manifest.gpu_name!r}, but no CUDA GPU is visible")
    elif manifest.gpu_name != gpu_name:
        problems.append(f"built for GPU {manifest.gpu_name!r}, this GPU is {gpu_name!r}")
    if checkpoint is not None and (checkpoint / "config.json").is_file():
        current = checkpoint_checksum(checkpoint)
        if current != manifest.checkpoint_checksum:
            problems.append(
                f"checkpoint {checkpoint} changed since the build "
                f"({manifest.checkpoint_checksum[:19]}... -> {current[:19]}...)"
            )
    return problems


#: Bytes read from each end of every engine file for `engine_revision`.
_ENGINE_SAMPLE_BYTES = 1 << 20


def engine_revision(engine_dir: Path) -> str:
    """The revision of a built engine, for cache keys and verdict events: `trt:sha256:` and 12 hex
    digits of a digest of its manifest and, for each file of the folder, its name, size and first
    and last MiB. A rebuilt engine (another checkpoint, tensorrt_llm version, build setting or
    build) gets another revision, so its verdicts are never read from an old engine's cache."""
    digest = hashlib.sha256()
    for path in sorted(p for p in engine_dir.iterdir() if p.is_file()):
        size = path.stat().st_size
        digest.update(f"\n{path.name}\0{size}\0".encode())
        with path.open("rb") as fh:
            digest.update(fh.read(_ENGINE_SAMPLE_BYTES))
            if size > _ENGINE_SAMPLE_BYTES:
                fh.seek(max(_ENGINE_SAMPLE_BYTES, size - _ENGINE_SAMPLE_BYTES))
                digest.update(fh.read(_ENGINE_SAMPLE_BYTES))
    return "trt:sha256:" + digest.hexdigest()[:12]
