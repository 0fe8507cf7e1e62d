"""The worker dies mid-stream (SIGKILL) or is stopped (SIGTERM) and restarted: nothing is lost;
duplicates are counted (at-least-once), absent with exactly-once, and after a graceful stop
bounded by what was in flight."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.faults.faulty_backend import write_control
from tests.faults.harness import (
    FaultWorker,
    Progress,
    duplicates,
    prompt_events,
    read_topic,
    replay_samples,
)
from tests.faults.services import OwnServices
from tests.service.harness import produce, topic_env

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

N = 5000
GUARANTEES = ("at_least_once", "exactly_once")


async def _kill_and_restart(
    guarantee: str,
    env: dict[str, str],
    events: list[tuple[bytes, bytes]],
    bootstrap: str,
    tmp_path: Path,
) -> dict[str, Any]:
    """One worker killed with SIGKILL a third of the way through the stream, a second one
    started in its place; the figures of the run."""
    env = {**env, "GUARDSTREAM_PROCESSING_GUARANTEE": guarantee}
    verdicts = env["GUARDSTREAM_TOPIC_VERDICTS"]
    control = tmp_path / f"{guarantee}.json"
    # a little engine time per batch, so that the kill lands with batches in flight
    write_control(control, delay_s=0.02)
    first = FaultWorker(env, tmp_path / f"{guarantee}-first.log", control)
    second = FaultWorker(env, tmp_path / f"{guarantee}-second.log", control)
    try:
        await asyncio.to_thread(first.start)
        async with Progress(bootstrap, verdicts) as progress:
            await produce(bootstrap, env["GUARDSTREAM_TOPIC_PROMPTS"], events)
            await progress.reach(N // 3, timeout=120)
            first.stop(signal.SIGKILL)
            killed_at = time.monotonic()
            at_kill = progress.count
        assert first.proc is not None and first.proc.returncode == -signal.SIGKILL
        assert at_kill < N, "the stream was already through when the worker was killed"
        await asyncio.to_thread(second.start, 150)
        ready_after = time.monotonic() - killed_at
        got = await read_topic(bootstrap, verdicts, until=N, timeout=150, settle=3.0)
        done_after = time.monotonic() - killed_at
        assert second.ready(), second.log_tail()
        log = second.log_text()
        # what a read_uncommitted reader sees: the aborted copies of exactly-once included
        raw = await read_topic(bootstrap, verdicts, until=N, timeout=30, committed_only=False)
    finally:
        for worker in (first, second):
            if worker.proc is not None:
                await asyncio.to_thread(worker.stop, signal.SIGTERM, 30)
    ids = [v["source_id"] for v in got]
    return {
        "guarantee": guarantee,
        "messages": N,
        "verdicts_before_kill": at_kill,
        "lost": len({f"m{i}" for i in range(N)} - set(ids)),
        "duplicates": duplicates(ids),
        "duplicates_read_uncommitted": duplicates([v["source_id"] for v in raw]),
        "restart_ready_s": round(ready_after, 1),
        "all_verdicts_s": round(done_after, 1),
        "traceback_in_log": "Traceback" in log,
    }


@pytest.mark.timeout(300)
async def test_sigkill_mid_stream_then_restart(
    fault_env: dict[str, str],
    replay_dir: Path,
    own_services: OwnServices,
    report: Callable[..., None],
    tmp_path: Path,
    unique: str,
) -> None:
    """Both guarantees side by side (each on topics and a consumer group of its own), so that
    the wait for the killed member's session to expire is paid once."""
    events = prompt_events(replay_samples(replay_dir), N)
    envs = {g: {**fault_env, **topic_env(f"{unique}{g[:3]}")} for g in GUARANTEES}
    alo, eos = await asyncio.gather(
        *(
            _kill_and_restart(g, envs[g], events, own_services.bootstrap, tmp_path)
            for g in GUARANTEES
        )
    )
    report(**alo)
    report(**eos)
    for figures in (alo, eos):
        assert figures["lost"] == 0, figures
        assert not figures["traceback_in_log"], figures
    # exactly-once (read_committed): no duplicate at all, although the killed worker had
    # written verdicts whose offsets it had not committed (a read_uncommitted reader sees them)
    assert eos["duplicates"] == 0, eos


@pytest.mark.timeout(240)
@pytest.mark.parametrize("guarantee", GUARANTEES)
async def test_sigterm_mid_stream_graceful_then_restart(
    guarantee: str,
    fault_env: dict[str, str],
    make_worker: Callable[..., FaultWorker],
    replay_dir: Path,
    control: Path,
    own_services: OwnServices,
    report: Callable[..., Any],
) -> None:
    n = 3000
    grace = float(fault_env["GUARDSTREAM_GRACE_PERIOD_S"])
    batch, in_flight = 32, 2
    env = {
        **fault_env,
        "GUARDSTREAM_PROCESSING_GUARANTEE": guarantee,
        "GUARDSTREAM_BATCH_MAX_SIZE": str(batch),
        "GUARDSTREAM_BATCH_MAX_IN_FLIGHT": str(in_flight),
    }
    bootstrap, verdicts = own_services.bootstrap, env["GUARDSTREAM_TOPIC_VERDICTS"]
    # slow enough that batches are in flight when the signal comes
    write_control(control, delay_s=0.15)
    events = prompt_events(replay_samples(replay_dir), n)
    first = make_worker(env, "first")
    first.start()
    async with Progress(bootstrap, verdicts) as progress:
        await produce(bootstrap, env["GUARDSTREAM_TOPIC_PROMPTS"], events)
        await progress.reach(n // 4, timeout=120)
        t0 = time.monotonic()
        rc = first.stop(signal.SIGTERM, timeout=grace + 15)
        shutdown_s = time.monotonic() - t0
        at_stop = progress.count
    assert rc == 0, f"exit status {rc}\n{first.log_tail()}"
    assert shutdown_s < grace, f"graceful shutdown took {shutdown_s:.1f}s (grace {grace}s)"
    log = first.log_text()
    assert "in-flight verdicts published" in log, first.log_tail()
    assert "Traceback" not in log, first.log_tail()

    write_control(control)
    second = make_worker(env, "second")
    t1 = time.monotonic()
    second.start()
    got = await read_topic(bootstrap, verdicts, until=n, timeout=120, settle=3.0)
    ids = [v["source_id"] for v in got]
    missing = {f"m{i}" for i in range(n)} - set(ids)
    dups = duplicates(ids)
    report(
        guarantee=guarantee,
        messages=n,
        verdicts_before_stop=at_stop,
        shutdown_s=round(shutdown_s, 2),
        lost=len(missing),
        duplicates=dups,
        restart_to_all_verdicts_s=round(time.monotonic() - t1, 1),
    )
    assert not missing, f"{len(missing)} inputs without a verdict"
    # A graceful stop publishes what was in flight and commits it: at most the batches that
    # were being generated (and the one filling) can be re-read.
    assert dups <= batch * (in_flight + 1), f"{dups} duplicates after a graceful stop"
    if guarantee == "exactly_once":
        assert dups == 0
    assert "Traceback" not in second.log_text()
