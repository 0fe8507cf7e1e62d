"""The processes under test: the guardstream worker (`python -m bench.worker`), the aiokafka
baseline (`python -m bench.baseline`) and the bare Faust agent (`python -m bench.faust_floor`),
each a subprocess with its own log file."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.data import REPO_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.argv, self.env, self.cwd, self.log = argv, env, cwd, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.cwd.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 40) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, at once (a worker with a backlog it would take minutes to drain)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far (Linux /proc)."""
        if self.proc is None:
            return 0.0
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _env(extra: dict[str, str], code_root: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARDSTREAM_")}
    path = env.get("PYTHONPATH")
    root = str(code_root or REPO_ROOT)
    if code_root is not None:
        root += os.pathsep + str(REPO_ROOT)  # bench.worker itself comes from this checkout
    env["PYTHONPATH"] = f"{root}{os.pathsep}{path}" if path else root
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class WorkerProc(Proc):
    """The guardstream worker; `settings` are GUARDSTREAM_* variables without the prefix."""

    def __init__(
        self,
        settings: dict[str, Any],
        bench_env: dict[str, str],
        workdir: Path,
        *,
        code_root: Path | None = None,
    ) -> None:
        self.port = free_port()
        env = {f"GUARDSTREAM_{k.upper()}": str(v) for k, v in settings.items()}
        env.update(bench_env)
        env.update(
            GUARDSTREAM_WEB_PORT=str(self.port),
            GUARDSTREAM_WEB_HOST="127.0.0.1",
            GUARDSTREAM_BENCH_STATS=str(workdir / "model-calls.json"),
        )
        self.stats_path = workdir / "model-calls.json"
        # cwd is the work folder: Faust writes its data folder there, not into the repository.
        super().__init__(
            [sys.executable, "-m", "bench.worker"],
            _env(env, code_root),
            workdir,
            workdir / "worker.log",
        )

    def ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.port}/readyz"
            with urllib.request.urlopen(url, timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"worker exited:\n{self.tail()}")
            if self.ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready in {timeout:.0f}s:\n{self.tail()}")

    def model_calls(self) -> dict[str, int]:
        stats = self.stats()
        return {k: int(stats.get(k, 0)) for k in ("calls", "inputs", "max_batch")}

    def stats(self) -> dict[str, Any]:
        """The worker's model-call counts, and with the simulated engine its counters under
        "engine" (`bench.worker` writes them every 0.2 s)."""
        try:
            data: dict[str, Any] = json.loads(self.stats_path.read_text())
            return data
        except (OSError, ValueError):
            return {"calls": 0, "inputs": 0, "max_batch": 0}


class BaselineProc(Proc):
    """A forwarder without the worker: `bench.baseline` (aiokafka alone) or `bench.faust_floor`
    (a bare Faust agent)."""

    def __init__(
        self,
        bootstrap: str,
        src: str,
        dst: str,
        group: str,
        workdir: Path,
        *,
        module: str = "bench.baseline",
        extra: list[str] | None = None,
    ) -> None:
        argv = [
            sys.executable,
            "-m",
            module,
            "--bootstrap",
            bootstrap,
            "--input",
            src,
            "--output",
            dst,
            "--group",
            group,
            *(extra or []),
        ]
        log = workdir / f"{module.rsplit('.', 1)[-1]}.log"
        # cwd is the work folder: Faust writes its data folder there, not into the repository.
        super().__init__(argv, _env({}), workdir, log)
