"""One measured run: start the system under test on fresh topics, warm it up, send messages
(a flood, a paced open loop, or a closed loop that keeps a bounded backlog), time what comes
out, stop it, delete its topics."""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.data import Message
from bench.kafka_io import Collector, create_topics, delete_topics, flood, new_producer, paced
from bench.procs import BaselineProc, Proc, WorkerProc


@dataclass
class Env:
    """What every run needs: where the services are, where to write, the worker's base."""

    bootstrap: str
    redis_url: str
    partitions: int
    workdir: Path
    bench_env: dict[str, str]  # GUARDSTREAM_BENCH_* for bench.worker
    base_settings: dict[str, Any]  # GUARDSTREAM_* (without prefix) for every worker
    quiet: bool = False
    code_root: Path | None = None  # run the worker from another checkout (A/B comparisons)
    keep_logs: bool = False  # keep each run's folder (worker log, Faust data) after a good run


@dataclass
class Target:
    """A system under test that is running: where to send, where its output arrives."""

    name: str
    input_topic: str
    output_topic: str
    proc: Proc
    worker: WorkerProc | None = None
    responses_topic: str | None = None  # a worker's: where response events go


@dataclass
class Timed:
    """What one sending phase measured."""

    sent: dict[bytes, float]  # key -> produce time
    started: float
    received: dict[bytes, Any] = field(default_factory=dict)  # key -> Received
    complete: bool = True
    cpu_s: float = 0.0  # CPU time the system under test used meanwhile

    @property
    def count(self) -> int:
        return len(self.received)

    @property
    def elapsed(self) -> float:
        last = max((r.at for r in self.received.values()), default=self.started)
        return max(last - self.started, 1e-9)

    @property
    def rate(self) -> float:
        return self.count / self.elapsed


def _run_id() -> str:
    return uuid.uuid4().hex[:8]


@contextmanager
def worker_target(
    env: Env, settings: dict[str, Any], bench_env: dict[str, str]
) -> Iterator[Target]:
    """A guardstream worker on fresh topics, ready (engine loaded, partitions assigned)."""
    rid = _run_id()
    prefix = f"gsbench-{rid}"
    topics = {
        "topic_prompts": f"{prefix}.prompts",
        "topic_responses": f"{prefix}.responses",
        "topic_verdicts": f"{prefix}.verdicts",
        "topic_flagged": f"{prefix}.flagged",
        "topic_dlq": f"{prefix}.dlq",
    }
    all_settings = {
        **env.base_settings,
        **topics,
        "app_id": prefix,
        "topic_partitions": env.partitions,
        **settings,
    }
    asyncio.run(create_topics(env.bootstrap, list(topics.values()), env.partitions))
    workdir = env.workdir / prefix
    workdir.mkdir(parents=True, exist_ok=True)
    proc = WorkerProc(
        all_settings,
        {"GUARDSTREAM_BENCH_SALT": rid, **env.bench_env, **bench_env},
        workdir,
        code_root=env.code_root,
    )
    proc.start()
    ok = False
    try:
        proc.wait_ready()
        yield Target(
            "worker",
            topics["topic_prompts"],
            topics["topic_verdicts"],
            proc,
            proc,
            topics["topic_responses"],
        )
        ok = True
    finally:
        proc.stop()
        asyncio.run(delete_topics(env.bootstrap, [prefix]))
        _tidy(env, workdir, ok)


@contextmanager
def baseline_target(env: Env, *, faust_floor: bool = False) -> Iterator[Target]:
    """The aiokafka baseline, or with `faust_floor` the bare Faust agent (`bench.faust_floor`)."""
    rid = _run_id()
    prefix = f"gsbench-{rid}"
    src, dst = f"{prefix}.in", f"{prefix}.out"
    asyncio.run(create_topics(env.bootstrap, [src, dst], env.partitions))
    workdir = env.workdir / prefix
    if faust_floor:
        module, extra = "bench.faust_floor", ["--partitions", str(env.partitions)]
    else:
        module, extra = "bench.baseline", []
    proc = BaselineProc(env.bootstrap, src, dst, prefix, workdir, module=module, extra=extra)
    proc.start()
    ok = False
    try:
        yield Target("faust floor" if faust_floor else "baseline", src, dst, proc)
        ok = True
    finally:
        proc.stop()
        asyncio.run(delete_topics(env.bootstrap, [prefix]))
        _tidy(env, workdir, ok)


def _tidy(env: Env, workdir: Path, ok: bool) -> None:
    """Remove a run's folder (log, Faust data) after a good run; keep it, and say where, after
    a failed one or with `keep_logs`."""
    if ok and not env.keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not ok:
        print(f"bench: the failed run's log is in {workdir}", file=sys.stderr)


async def _warm(
    target: Target, collector: Collector, producer: Any, warm: Sequence[Message]
) -> None:
    if not warm:
        return
    await flood(producer, target.input_topic, warm)
    if not await collector.wait_for([m.key for m in warm], timeout=180):
        worker = target.worker.tail() if target.worker else ""
        raise RuntimeError(f"{target.name}: warm-up output did not arrive\n{worker}")


async def _send_and_collect(
    env: Env,
    target: Target,
    warm: Sequence[Message],
    messages: Sequence[Message],
    *,
    rate: float | None,
    label: str,
    timeout: float,
    keep_values: bool,
) -> Timed:
    collector = Collector(
        env.bootstrap, target.output_topic, env.partitions, keep_values=keep_values
    )
    await collector.start()
    producer = new_producer(env.bootstrap)
    await producer.start()
    try:
        await _warm(target, collector, producer, warm)
        with tqdm(
            total=len(messages), desc=label, unit="msg", leave=False, disable=env.quiet
        ) as bar:
            collector.on_record = bar.update
            cpu0 = target.proc.cpu_seconds()
            if rate is None:
                started, sent = await flood(producer, target.input_topic, messages)
            else:
                started, sent = await paced(producer, target.input_topic, messages, rate)
            keys = [m.key for m in messages]
            complete = await collector.wait_for(keys, timeout=timeout)
            cpu = target.proc.cpu_seconds() - cpu0
            collector.on_record = None
        received = {k: collector.records[k] for k in keys if k in collector.records}
        return Timed(sent, started, received, complete, cpu)
    finally:
        await producer.stop()
        await collector.stop()


def run_messages(
    env: Env,
    target: Target,
    warm: Sequence[Message],
    messages: Sequence[Message],
    *,
    rate: float | None = None,
    label: str = "",
    timeout: float = 600,
    keep_values: bool = False,
) -> Timed:
    """Warm up, then send `messages` (a flood when `rate` is None, else paced at `rate`/s), and
    wait for one output record per message key."""
    return asyncio.run(
        _send_and_collect(
            env,
            target,
            warm,
            messages,
            rate=rate,
            label=label or target.name,
            timeout=timeout,
            keep_values=keep_values,
        )
    )


@dataclass
class Saturation:
    """A closed-loop run: throughput over the window, and what the whole phase sent and got."""

    rate: float  # outputs per second within the window
    sent: list[bytes]
    received: dict[bytes, Any]
    drained: bool
    cpu_s: float


async def _closed_loop(
    env: Env,
    target: Target,
    warm: Sequence[Message],
    messages: Sequence[Message],
    *,
    backlog: int,
    seconds: float,
    settle: float,
    label: str,
    keep_values: bool,
    drain_timeout: float,
) -> Saturation:
    collector = Collector(env.bootstrap, target.output_topic, env.partitions, keep_values)
    await collector.start()
    producer = new_producer(env.bootstrap)
    await producer.start()
    try:
        await _warm(target, collector, producer, warm)
        base = len(collector.records)
        sent: list[bytes] = []
        cpu0 = target.proc.cpu_seconds()
        began = time.monotonic()
        window_start: float | None = None
        window_count = 0
        rate = 0.0
        total = seconds + settle
        with tqdm(total=total, desc=label, unit="s", leave=False, disable=env.quiet) as bar:
            while True:
                now = time.monotonic()
                done = len(collector.records) - base
                if window_start is None and now - began >= settle:
                    window_start, window_count = now, done
                if window_start is not None and now - window_start >= seconds:
                    rate = (done - window_count) / (now - window_start)
                    break
                room = backlog - (len(sent) - done)
                if room > 0 and len(sent) < len(messages):
                    for m in messages[len(sent) : len(sent) + room]:
                        await producer.send(target.input_topic, m.value(), key=m.key)
                        sent.append(m.key)
                bar.update(round(min(now - began, total), 1) - bar.n)
                await asyncio.sleep(0.02)
        await producer.flush()
        drained = await collector.wait_for(sent, timeout=drain_timeout)
        cpu = target.proc.cpu_seconds() - cpu0
        received = {k: collector.records[k] for k in sent if k in collector.records}
        return Saturation(rate, sent, received, drained, cpu)
    finally:
        await producer.stop()
        await collector.stop()


def run_capacity(
    env: Env,
    target: Target,
    warm: Sequence[Message],
    messages: Sequence[Message],
    *,
    backlog: int,
    seconds: float,
    settle: float = 2.0,
    label: str = "capacity",
    keep_values: bool = False,
    drain_timeout: float = 120.0,
) -> Saturation:
    """Saturation throughput: a closed loop keeps `backlog` messages outstanding (sent, no
    output yet) and counts outputs over `seconds` after `settle` seconds; then it stops sending
    and waits for the rest (so the next phase on the same worker starts from an empty queue).
    `messages` must outlast the window (the loop stops sending when they run out)."""
    return asyncio.run(
        _closed_loop(
            env,
            target,
            warm,
            messages,
            backlog=backlog,
            seconds=seconds,
            settle=settle,
            label=label,
            keep_values=keep_values,
            drain_timeout=drain_timeout,
        )
    )
