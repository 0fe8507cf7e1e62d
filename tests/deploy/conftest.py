"""Fixtures of the deployment tests: the pinned helm binary and cached chart renders."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import ENV_PREFIX, Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "helm" / "guardstream"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
HELM_TOOLS = REPO_ROOT / "deploy" / "helm-tools"
#: The Kubernetes version the chart is rendered for and validated against (kubernetes-validate
#: ships schemas for it).
KUBE_VERSION = "1.31.0"
RELEASE = "gs"
NAMESPACE = "moderation"
#: Every GUARDSTREAM_ variable the service reads (pydantic-settings: prefix + field name).
KNOWN_SETTINGS = {ENV_PREFIX + name.upper() for name in Settings.model_fields}


@dataclass
class Render:
    """One `helm template` run: its exit status, output and parsed manifests."""

    returncode: int
    stdout: str
    stderr: str
    docs: list[dict[str, Any]] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d.get("kind") == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind}/{name}, rendered: {self.names()}"
        return found[0]

    def names(self) -> list[str]:
        return [f"{d['kind']}/{d['metadata']['name']}" for d in self.docs]


@pytest.fixture(scope="session")
def helm() -> Path:
    """The helm binary in .tools/bin, built by deploy/helm-tools when missing."""
    if os.environ.get("GUARDSTREAM_SKIP_HELM") == "1":
        pytest.skip(
            "GUARDSTREAM_SKIP_HELM=1: chart tests skipped on request (they need deploy/helm-tools "
            "to build helm with the Go toolchain through the Go module proxy)"
        )
    try:
        proc = subprocess.run(
            [str(HELM_TOOLS)], capture_output=True, text=True, timeout=1200, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"deploy/helm-tools could not run: {exc}")
    if proc.returncode != 0:
        pytest.fail(
            f"deploy/helm-tools failed (exit {proc.returncode}); set GUARDSTREAM_SKIP_HELM=1 to "
            f"skip the chart tests on a machine without Go or the module proxy.\n{proc.stderr}"
        )
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.is_file(), f"deploy/helm-tools printed {path}, which does not exist"
    return path


@pytest.fixture(scope="session")
def render(helm: Path) -> Callable[..., Render]:
    """render(*values_files, sets=[...], chart=CHART) -> Render, cached per arguments."""
    cache: dict[tuple[Any, ...], Render] = {}

    def _render(*values: Path | str, sets: Sequence[str] = (), chart: Path = CHART) -> Render:
        key = (tuple(str(v) for v in values), tuple(sets), str(chart))
        if key not in cache:
            cmd = [
                str(helm),
                "template",
                RELEASE,
                str(chart),
                "--namespace",
                NAMESPACE,
                "--kube-version",
                KUBE_VERSION,
            ]
            for v in values:
                cmd += ["-f", str(v)]
            for s in sets:
                cmd += ["--set", s]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
            docs = []
            if proc.returncode == 0:
                docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
            cache[key] = Render(proc.returncode, proc.stdout, proc.stderr, docs)
        return cache[key]

    return _render
