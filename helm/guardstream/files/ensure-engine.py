"""Make sure ENGINE_DIR holds a TensorRT-LLM engine the worker will accept on this pod's GPU.

Runs in the worker pod's init container (mounted from the chart's ConfigMap):

    python3 ensure-engine.py ENGINE_DIR -- guardstream engine build --checkpoint C --output {output}

The check is the worker's own: with guardstream installed (the GPU image) it reads
ENGINE_DIR/guardstream-engine.json with engine.trtllm_manifest and asks manifest_mismatches()
about the installed tensorrt_llm version, this GPU and the checkpoint named by the build
command's --checkpoint. Without guardstream it compares the manifest's tensorrt_llm_version and
gpu_name only. If the engine fits, nothing is done. Otherwise the build command runs with
`{output}` replaced by a new scratch folder next to ENGINE_DIR; when it succeeds and the new
engine fits, the scratch folder replaces ENGINE_DIR, so a failed or interrupted build never
leaves a half-written engine where the worker looks. A lock file serialises pods sharing the
volume.

GUARDSTREAM_ENSURE_GPU_NAME and GUARDSTREAM_ENSURE_TRTLLM_VERSION override the detected values
(for tests, or nodes without nvidia-smi).
"""

from __future__ import annotations

import fcntl
import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

MANIFEST = "guardstream-engine.json"

trtllm_manifest: ModuleType | None
try:  # the worker's own manifest logic, when guardstream is installed (the GPU image)
    trtllm_manifest = importlib.import_module("engine.trtllm_manifest")
except ImportError:  # exercised by the tests with python -S
    trtllm_manifest = None


def log(msg: str) -> None:
    print(f"ensure-engine: {msg}", file=sys.stderr, flush=True)


def installed_trtllm_version() -> str:
    override = os.environ.get("GUARDSTREAM_ENSURE_TRTLLM_VERSION")
    if override:
        return override
    if trtllm_manifest is not None:
        # Exactly what the worker compares: tensorrt_llm.__version__.
        return str(trtllm_manifest.installed_version(trtllm_manifest.import_tensorrt_llm()))
    for dist in ("tensorrt_llm", "tensorrt-llm"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise SystemExit("ensure-engine: tensorrt_llm is not installed in this image")


def gpu_name() -> str:
    override = os.environ.get("GUARDSTREAM_ENSURE_GPU_NAME")
    if override:
        return override
    if trtllm_manifest is not None:
        name = trtllm_manifest.detect_gpu_name()
        if name is None:
            raise SystemExit("ensure-engine: no CUDA GPU visible to this container")
        return str(name)
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],  # noqa: S607 (GPU runtime)
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise SystemExit(f"ensure-engine: cannot ask nvidia-smi for the GPU name: {exc}") from exc
    names = [line.strip() for line in out.splitlines() if line.strip()]
    if not names:
        raise SystemExit("ensure-engine: nvidia-smi lists no GPU")
    return names[0]


def mismatch(engine_dir: Path, version: str, gpu: str, checkpoint: Path | None) -> str | None:
    """Why the worker would refuse the engine in engine_dir, or None when it fits."""
    if trtllm_manifest is not None:
        try:
            manifest = trtllm_manifest.EngineManifest.read(engine_dir)
        except trtllm_manifest.TrtllmSetupError as exc:
            return str(exc)
        if manifest is None:
            return f"no {MANIFEST} in {engine_dir}"
        problems = trtllm_manifest.manifest_mismatches(
            manifest, version=version, gpu_name=gpu, checkpoint=checkpoint
        )
        return "; ".join(problems) or None
    path = engine_dir / MANIFEST
    try:
        manifest_data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {MANIFEST} in {engine_dir}"
    except (OSError, ValueError) as exc:
        return f"unreadable {path}: {exc}"
    if not isinstance(manifest_data, dict):
        return f"{path} is not a JSON object"
    if manifest_data.get("tensorrt_llm_version") != version:
        return (
            f"built with tensorrt_llm {manifest_data.get('tensorrt_llm_version')}, "
            f"installed is {version}"
        )
    if manifest_data.get("gpu_name") != gpu:
        return f"built for GPU {manifest_data.get('gpu_name')!r}, this GPU is {gpu!r}"
    return None


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") != 2 or len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    engine_dir = Path(argv[1])
    command = argv[3:]
    if not any("{output}" in arg for arg in command):
        log("the build command must contain {output}")
        return 2

    checkpoint = (
        Path(command[command.index("--checkpoint") + 1]) if "--checkpoint" in command[:-1] else None
    )
    version, gpu = installed_trtllm_version(), gpu_name()
    engine_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = engine_dir.parent / f".{engine_dir.name}.lock"
    with lock_path.open("a") as lock:
        log(f"waiting for {lock_path}")
        fcntl.flock(lock, fcntl.LOCK_EX)
        reason = mismatch(engine_dir, version, gpu, checkpoint)
        if reason is None:
            log(f"{engine_dir} fits tensorrt_llm {version} on {gpu!r}: nothing to build")
            return 0
        log(f"building: {reason}")

        scratch = engine_dir.parent / f".{engine_dir.name}.build-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        cmd = [arg.replace("{output}", str(scratch)) for arg in command]
        log("running " + " ".join(cmd))
        started = time.monotonic()
        rc = subprocess.call(cmd)  # noqa: S603 (command from the chart's own template)
        if rc != 0:
            shutil.rmtree(scratch, ignore_errors=True)
            log(f"build failed with exit status {rc}; {engine_dir} left as it was")
            return rc
        reason = mismatch(scratch, version, gpu, checkpoint)
        if reason is not None:
            shutil.rmtree(scratch, ignore_errors=True)
            log(f"the new engine does not match either: {reason}")
            return 1
        if engine_dir.exists():
            retired = engine_dir.parent / f".{engine_dir.name}.old-{os.getpid()}"
            engine_dir.rename(retired)
            shutil.rmtree(retired, ignore_errors=True)
        scratch.rename(engine_dir)
        log(f"built {engine_dir} in {time.monotonic() - started:.0f}s")
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
