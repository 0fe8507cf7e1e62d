"""Servers of the secrets test's own: a Kafka broker with a SASL/PLAIN listener (the shared one is
PLAINTEXT) and a Redis that requires a password. Both are started from the jars and binaries
`deploy/local/up` uses, in a temporary folder, and stopped by their pid."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

from tests.conftest import REPO_ROOT
from tests.service.harness import free_port

LOCAL = REPO_ROOT / "deploy" / "local"


def kafka_libs() -> Path | None:
    env = os.environ.get("GUARDSTREAM_LOCAL_KAFKA_LIBS")
    path = Path(env) if env else LOCAL / ".state" / "kafka-libs"
    return path if (path / ".pom.sha256").exists() else None


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class SaslBroker:
    """A one-node KRaft broker whose client listener is SASL_PLAINTEXT with PLAIN users."""

    def __init__(self, root: Path, users: dict[str, str]) -> None:
        self.root = root
        self.port = free_port()
        self.controller_port = free_port()
        self.users = users
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, libs: Path, timeout: float = 120) -> None:
        data, logs = self.root / "data", self.root / "logs"
        data.mkdir(parents=True)
        logs.mkdir()
        accounts = " ".join(f'user_{u}="{p}"' for u, p in self.users.items())
        admin_user, admin_password = next(iter(self.users.items()))
        jaas = (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'username="{admin_user}" password="{admin_password}" {accounts};'
        )
        props = self.root / "server.properties"
        props.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
                    f"listeners=SASL_PLAINTEXT://127.0.0.1:{self.port},"
                    f"CONTROLLER://127.0.0.1:{self.controller_port}",
                    f"advertised.listeners=SASL_PLAINTEXT://127.0.0.1:{self.port}",
                    "inter.broker.listener.name=SASL_PLAINTEXT",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT",
                    "sasl.enabled.mechanisms=PLAIN",
                    "sasl.mechanism.inter.broker.protocol=PLAIN",
                    f"listener.name.sasl_plaintext.plain.sasl.jaas.config={jaas}",
                    f"log.dirs={data}",
                    "num.partitions=1",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=2",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "",
                ]
            )
        )
        cp = f"{libs}/*"
        logging = [
            f"-Dlog4j2.configurationFile={LOCAL / 'log4j2.yaml'}",
            f"-Dkafka.logs.dir={logs}",
        ]
        java = shutil.which("java") or "java"
        cluster = subprocess.run(
            [java, "-cp", cp, "kafka.tools.StorageTool", "random-uuid"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        storage = [java, "-cp", cp, *logging, "kafka.tools.StorageTool"]
        subprocess.run(
            [*storage, "format", "-t", cluster, "-c", str(props)],
            capture_output=True,
            check=True,
        )
        with (logs / "stdout.log").open("wb") as out:
            self.proc = subprocess.Popen(
                [java, "-Xms256m", "-Xmx256m", "-cp", cp, *logging, "kafka.Kafka", str(props)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def wait_ready(self, timeout: float = 120) -> None:
        user, password = next(iter(self.users.items()))
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"SASL broker exited ({self.proc.returncode})")
            admin = AIOKafkaAdminClient(**self.client_kwargs(user, password))
            try:
                await admin.start()
                await admin.describe_cluster()
                return
            except Exception as exc:
                last = exc
            finally:
                await admin.close()
            await asyncio.sleep(0.5)
        raise TimeoutError(f"SASL broker not ready in {timeout}s: {last}")

    def client_kwargs(self, user: str, password: str) -> dict[str, str]:
        return {
            "bootstrap_servers": self.bootstrap,
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "PLAIN",
            "sasl_plain_username": user,
            "sasl_plain_password": password,
        }

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


class PasswordRedis:
    def __init__(self, root: Path, password: str) -> None:
        self.root = root
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        server = shutil.which("redis-server") or "redis-server"
        where = ["--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.root)]
        self.proc = subprocess.Popen(
            [server, *where, "--save", "", "--appendonly", "no", "--requirepass", self.password],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def url(self, password: str | None = None) -> str:
        return f"redis://:{password or self.password}@127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
