"""Recovery of the recent-prompts table: how long a worker that takes over partitions holding N
stored prompts needs before it is ready (the table read back from its changelog).

    python -m bench.recovery [--prompts 100000] [--bootstrap 127.0.0.1:9092] [--redis URL]

Against a running broker and Redis (`deploy/local/up`). A first worker stores N prompts (with
GUARDSTREAM_MODERATE=responses, so that the fill is quick: the prompts are stored for pairing,
not moderated; the table and its changelog are the same as with the default `both`), is
stopped with SIGTERM once the changelog holds them all; a second worker with the default
settings is started on the same consumer group and timed until `/readyz` says ready, and then
a response by `reply_to` to the first prompt is checked to pair. Prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from tqdm import tqdm

from bench.data import REPO_ROOT
from bench.procs import Proc, free_port

PARTITIONS = 8


def _worker(env: dict[str, str], log: Path) -> tuple[Proc, int]:
    port = free_port()
    full = {
        **os.environ,
        **env,
        "GUARDSTREAM_WEB_PORT": str(port),
        "GUARDSTREAM_WEB_HOST": "127.0.0.1",
        "GUARDSTREAM_LOG_FORMAT": "text",
        "PYTHONUNBUFFERED": "1",
    }
    return Proc([sys.executable, "-m", "service.cli", "serve"], full, REPO_ROOT, log), port


def _ready(port: int) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _wait_ready(proc: Proc, port: int, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not proc.alive():
            raise RuntimeError(f"worker exited:\n{proc.log.read_text()[-3000:]}")
        if _ready(port):
            return time.monotonic() - t0
        time.sleep(0.1)
    raise TimeoutError(f"worker not ready in {timeout}s:\n{proc.log.read_text()[-3000:]}")


async def _changelog_size(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in parts])
        return sum(ends.values())
    finally:
        await consumer.stop()


async def run(
    n: int, bootstrap: str, redis_url: str, replay: Path, out_dir: Path
) -> dict[str, object]:
    u = uuid.uuid4().hex[:8]
    env = {
        "GUARDSTREAM_APP_ID": f"bench-recovery-{u}",
        "GUARDSTREAM_TOPIC_PROMPTS": f"br{u}.prompts",
        "GUARDSTREAM_TOPIC_RESPONSES": f"br{u}.responses",
        "GUARDSTREAM_TOPIC_VERDICTS": f"br{u}.verdicts",
        "GUARDSTREAM_TOPIC_FLAGGED": f"br{u}.flagged",
        "GUARDSTREAM_TOPIC_DLQ": f"br{u}.dlq",
        "GUARDSTREAM_TOPIC_PARTITIONS": str(PARTITIONS),
        "GUARDSTREAM_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "GUARDSTREAM_REDIS_URL": redis_url,
        "GUARDSTREAM_ENGINE": "replay",
        "GUARDSTREAM_REPLAY_PATH": str(replay),
        "GUARDSTREAM_PROMPT_TABLE_MAX": str(max(n, 100_000)),
    }
    changelog = f"{env['GUARDSTREAM_APP_ID']}-recent-prompts-changelog"
    fill, fill_port = _worker(
        {**env, "GUARDSTREAM_MODERATE": "responses"}, out_dir / f"fill-{u}.log"
    )
    fill.start()
    _wait_ready(fill, fill_port, 120)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    await producer.start()
    text = "How do I reset the password of my own router? " * 4
    try:
        futures = []
        for i in tqdm(range(n), desc="prompts", unit="msg", file=sys.stderr):
            conv = f"conv-{i % 5000}"
            body = {"id": f"p{i}", "conversation_id": conv, "text": f"{text}#{i}"}
            futures.append(
                await producer.send(
                    env["GUARDSTREAM_TOPIC_PROMPTS"], json.dumps(body).encode(), key=conv.encode()
                )
            )
        await asyncio.gather(*futures)
        t0 = time.monotonic()
        with tqdm(total=n, desc="stored", unit="msg", file=sys.stderr) as bar:
            while (size := await _changelog_size(bootstrap, changelog)) < n:
                bar.update(size - bar.n)
                if time.monotonic() - t0 > 900:
                    raise TimeoutError(f"changelog holds {size} of {n}")
                await asyncio.sleep(0.5)
            bar.update(size - bar.n)
        fill.stop()
        second, port = _worker(env, out_dir / f"second-{u}.log")
        second.start()
        ready_s = _wait_ready(second, port, 900)
        log = second.log.read_text()
        stamps = [
            datetime.strptime(m, "%Y-%m-%d %H:%M:%S,%f")
            for m in re.findall(
                r"^(\S+ \S+) INFO\s+faust\.tables\.recovery: "
                r".*(?:Restoring state|Recovery complete)",
                log,
                re.M,
            )
        ]
        recovery_s = (stamps[-1] - stamps[0]).total_seconds() if len(stamps) >= 2 else None
        # and the first prompt pairs
        reply = {
            "id": "r0",
            "conversation_id": "conv-0",
            "reply_to": "p0",
            "text": "Hold reset for 30 s.",
        }
        await producer.send_and_wait(
            env["GUARDSTREAM_TOPIC_RESPONSES"], json.dumps(reply).encode(), key=b"conv-0"
        )
        consumer = AIOKafkaConsumer(
            env["GUARDSTREAM_TOPIC_VERDICTS"],
            bootstrap_servers=bootstrap,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            verdict = json.loads((await asyncio.wait_for(consumer.getone(), 120)).value)
        finally:
            await consumer.stop()
        second.stop()
    finally:
        await producer.stop()
        fill.stop()
    return {
        "stored_prompts": n,
        "changelog_records": size,
        "partitions": PARTITIONS,
        "time_to_ready_s": round(ready_s, 2),
        "table_recovery_s": round(recovery_s, 2) if recovery_s is not None else None,
        "recovered_per_s": round(n / recovery_s) if recovery_s else None,
        "first_prompt_paired_after_recovery": verdict["source_id"] == "r0"
        and not verdict["prompt_missing"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.recovery", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--prompts", type=int, default=100_000)
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--replay",
        type=Path,
        default=REPO_ROOT.parent / "shared" / "guardreasoner" / "predictions" / "1B",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/out/recovery"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    figures = asyncio.run(
        run(args.prompts, args.bootstrap, args.redis, args.replay, args.out.resolve())
    )
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
