"""Readiness probe of the local broker: succeeds once a Kafka metadata request is answered.

Uses aiokafka (the client guardstream itself uses) when it is importable; otherwise sends a raw
Kafka ApiVersions request over TCP, so that `deploy/local/up` also works before `make install`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import sys
import time


async def _aiokafka_metadata(bootstrap: str) -> int:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
        return len(cluster.get("brokers", []))
    finally:
        await admin.close()


def _raw_api_versions(host: str, port: int) -> int:
    client_id = b"guardstream-local"
    # ApiVersions (key 18) v0: header = api_key, api_version, correlation_id, client_id.
    body = struct.pack(">hhih", 18, 0, 7, len(client_id)) + client_id
    with socket.create_connection((host, port), timeout=3) as sock:
        sock.sendall(struct.pack(">i", len(body)) + body)
        size = struct.unpack(">i", sock.recv(4))[0]
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            data += chunk
    correlation_id, error_code = struct.unpack(">ih", data[:6])
    if correlation_id != 7 or error_code != 0:
        raise ConnectionError(f"unexpected ApiVersions answer (error code {error_code})")
    return 1


def probe(bootstrap: str) -> int:
    try:
        import aiokafka  # noqa: F401
    except ImportError:
        host, port = bootstrap.rsplit(":", 1)
        return _raw_api_versions(host, int(port))
    return asyncio.run(_aiokafka_metadata(bootstrap))


def main() -> int:
    bootstrap, timeout = sys.argv[1], float(sys.argv[2])
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # refusals are expected at first
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            brokers = probe(bootstrap)
            if brokers:
                return 0
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            last = exc
        time.sleep(0.5)
    print(f"Kafka at {bootstrap} did not answer within {timeout:.0f}s: {last}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
