"""helm/guardstream/files/ensure-engine.py: the init container's build-unless-it-fits step.

Runs the real script with a stand-in build command (a Python snippet that writes an engine
folder and its manifest) and overridden GPU name / tensorrt_llm version, in both of its modes:
with guardstream importable (the GPU image: the worker's own manifest check, checkpoint
checksum included) and standalone (`python -S`: version and GPU only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.trtllm_manifest import BuildSettings, EngineManifest, checkpoint_checksum
from tests.deploy.conftest import CHART

SCRIPT = CHART / "files" / "ensure-engine.py"
GPU = "NVIDIA H100 80GB HBM3"
VERSION = "1.2.1"

FAKE_BUILD = """
import json, pathlib, sys
out, ckpt, version, gpu, rc = sys.argv[1:6]
out = pathlib.Path(out)
out.mkdir(parents=True)
(out / "rank0.engine").write_text("engine")
try:
    from engine.trtllm_manifest import BuildSettings, EngineManifest, checkpoint_checksum
except ImportError:
    (out / "guardstream-engine.json").write_text(
        json.dumps({"tensorrt_llm_version": version, "gpu_name": gpu}))
else:
    ckpt = pathlib.Path(ckpt)
    EngineManifest(model_id="m", checkpoint=str(ckpt), checkpoint_checksum=checkpoint_checksum(
        ckpt), tensorrt_llm_version=version, gpu_name=gpu, build=BuildSettings(),
        built_at="now").write(out)
sys.exit(int(rc))
"""

MODES = ["guardstream", "standalone"]


def python(mode: str) -> list[str]:
    return [sys.executable] if mode == "guardstream" else [sys.executable, "-S"]


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    ckpt = tmp_path / "models" / "GuardReasoner-8B"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text('{"_name_or_path": "GuardReasoner-8B"}')
    (ckpt / "model.safetensors").write_bytes(b"\0" * 64)
    return ckpt


def run(
    mode: str,
    engine_dir: Path,
    checkpoint: Path,
    *,
    built_version: str = VERSION,
    built_gpu: str = GPU,
    build_rc: int = 0,
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "GUARDSTREAM_ENSURE_GPU_NAME": GPU,
        "GUARDSTREAM_ENSURE_TRTLLM_VERSION": VERSION,
    }
    build = [*python(mode), "-c", FAKE_BUILD, "{output}", str(checkpoint)]
    build += [built_version, built_gpu, str(build_rc), "--checkpoint", str(checkpoint)]
    cmd = [*python(mode), str(SCRIPT), str(engine_dir), "--", *build]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)


def write_engine(mode: str, engine_dir: Path, checkpoint: Path, version: str, gpu: str) -> None:
    engine_dir.mkdir(parents=True)
    (engine_dir / "rank0.engine").write_text("old")
    if mode == "standalone":
        (engine_dir / "guardstream-engine.json").write_text(
            json.dumps({"tensorrt_llm_version": version, "gpu_name": gpu})
        )
        return
    EngineManifest(
        model_id="m",
        checkpoint=str(checkpoint),
        checkpoint_checksum=checkpoint_checksum(checkpoint),
        tensorrt_llm_version=version,
        gpu_name=gpu,
        build=BuildSettings(),
        built_at="earlier",
    ).write(engine_dir)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".build-" in p.name or ".old-" in p.name)


@pytest.mark.parametrize("mode", MODES)
def test_builds_when_no_engine(tmp_path: Path, checkpoint: Path, mode: str) -> None:
    engine = tmp_path / "engines" / "gr-8b"
    proc = run(mode, engine, checkpoint)
    assert proc.returncode == 0, proc.stderr
    assert "no guardstream-engine.json" in proc.stderr
    assert (engine / "rank0.engine").read_text() == "engine"
    assert leftovers(engine.parent) == []


@pytest.mark.parametrize("mode", MODES)
def test_keeps_a_fitting_engine(tmp_path: Path, checkpoint: Path, mode: str) -> None:
    engine = tmp_path / "gr-8b"
    write_engine(mode, engine, checkpoint, VERSION, GPU)
    proc = run(mode, engine, checkpoint, build_rc=3)  # the build would fail: it must not run
    assert proc.returncode == 0, proc.stderr
    assert "nothing to build" in proc.stderr
    assert (engine / "rank0.engine").read_text() == "old"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("version", "gpu", "why"),
    [
        ("1.2.0", GPU, "tensorrt_llm 1.2.0"),
        (VERSION, "NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-80GB"),
    ],
)
def test_rebuilds_a_mismatching_engine(
    tmp_path: Path, checkpoint: Path, mode: str, version: str, gpu: str, why: str
) -> None:
    engine = tmp_path / "gr-8b"
    write_engine(mode, engine, checkpoint, version, gpu)
    proc = run(mode, engine, checkpoint)
    assert proc.returncode == 0, proc.stderr
    assert why in proc.stderr
    assert (engine / "rank0.engine").read_text() == "engine"
    assert json.loads((engine / "guardstream-engine.json").read_text())["gpu_name"] == GPU
    assert leftovers(tmp_path) == []


def test_rebuilds_when_the_checkpoint_changed(tmp_path: Path, checkpoint: Path) -> None:
    engine = tmp_path / "gr-8b"
    write_engine("guardstream", engine, checkpoint, VERSION, GPU)
    (checkpoint / "model.safetensors").write_bytes(b"\0" * 65)
    proc = run("guardstream", engine, checkpoint)
    assert proc.returncode == 0, proc.stderr
    assert "changed since the build" in proc.stderr
    assert (engine / "rank0.engine").read_text() == "engine"


@pytest.mark.parametrize("mode", MODES)
def test_failed_build_leaves_the_old_engine(tmp_path: Path, checkpoint: Path, mode: str) -> None:
    engine = tmp_path / "gr-8b"
    write_engine(mode, engine, checkpoint, "1.1.0", GPU)
    proc = run(mode, engine, checkpoint, build_rc=7)
    assert proc.returncode == 7
    assert "left as it was" in proc.stderr
    assert (engine / "rank0.engine").read_text() == "old"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("mode", MODES)
def test_a_build_that_still_mismatches_fails(tmp_path: Path, checkpoint: Path, mode: str) -> None:
    engine = tmp_path / "gr-8b"
    proc = run(mode, engine, checkpoint, built_gpu="something else")
    assert proc.returncode == 1
    assert "does not match either" in proc.stderr
    assert not engine.exists()
    assert leftovers(tmp_path) == []


def test_usage_errors(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "GUARDSTREAM_ENSURE_GPU_NAME": GPU,
        "GUARDSTREAM_ENSURE_TRTLLM_VERSION": VERSION,
    }
    no_separator = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert no_separator.returncode == 2
    no_placeholder = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "e"), "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert no_placeholder.returncode == 2
    assert "{output}" in no_placeholder.stderr
