"""`python -m bench.faust_floor`: the most any Faust agent moves on this machine, for the overhead
table. A Faust app with the worker's Kafka settings (acks=all, linger 5 ms, 1 s commits) and
monitor (`QuietMonitor`), and one agent that forwards each message, unchanged, to the output
topic: no decoding, no model, no ordering of publishes, offsets acked as Faust does by default
(when the next event is taken, not after the broker took the output). The worker does all this
and more; so its rate can at most reach this one, and the gap from here to the aiokafka baseline
is Faust's own.

    python -m bench.faust_floor --bootstrap 127.0.0.1:9092 --input IN --output OUT --group G
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import faust

from service.telemetry.faust_monitor import QuietMonitor


def build_app(args: argparse.Namespace) -> faust.App:
    app = faust.App(
        args.group,
        broker=f"kafka://{args.bootstrap}",
        store="memory://",
        topic_partitions=args.partitions,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_linger_ms=5,
        stream_wait_empty=True,
        broker_commit_interval=1.0,
        web_enabled=False,
        monitor=QuietMonitor(),
    )
    raw: dict[str, Any] = {
        "key_type": bytes,
        "value_type": bytes,
        "key_serializer": "raw",
        "value_serializer": "raw",
    }
    source = app.topic(args.input, **raw)

    @app.agent(source, name="forward")  # type: ignore[untyped-decorator]
    async def forward(stream: Any) -> None:
        producer = await app.maybe_start_producer()
        async for event in stream.events():
            msg = event.message
            await producer.send(args.output, msg.key, msg.value, None, None, list(msg.headers))

    return app


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faust_floor")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--partitions", type=int, default=8)
    args = p.parse_args()
    app = build_app(args)
    worker = faust.Worker(app, loglevel="WARNING", quiet=True)
    worker.spinner = None
    worker.execute_from_commandline()
    return 0


if __name__ == "__main__":
    sys.exit(main())
