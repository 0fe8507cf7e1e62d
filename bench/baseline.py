"""`python -m bench.baseline`: the yardstick the worker is measured against. aiokafka alone:
consume the input topic, produce each message unchanged to the output topic, and commit the
input offsets once the broker acknowledged the produces (the same at-least-once "commit after
produce" the worker keeps, with the same producer acks and linger). No decoding, no model.

    python -m bench.baseline --bootstrap 127.0.0.1:9092 --input IN --output OUT --group G
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer


async def run(args: argparse.Namespace) -> None:
    consumer = AIOKafkaConsumer(
        args.input,
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, acks="all", linger_ms=5)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await producer.start()
    await consumer.start()
    print("baseline: ready", flush=True)
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=2000)
            if not batches:
                continue
            pending = []
            for records in batches.values():
                for rec in records:
                    pending.append(
                        await producer.send(
                            args.output, rec.value, key=rec.key, headers=rec.headers
                        )
                    )
            await asyncio.gather(*pending)
            await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.baseline")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--group", required=True)
    asyncio.run(run(p.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
