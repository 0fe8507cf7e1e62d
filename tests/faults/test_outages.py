"""The broker or Redis goes away mid-stream and comes back: the worker rides it out by itself.

Both tests stop services of the fault suite's own (`own_services`), never the shared ones."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.faulty_backend import write_control
from tests.faults.harness import (
    FaultWorker,
    Progress,
    duplicates,
    prompt_events,
    read_topic,
    replay_samples,
    wait_for,
)
from tests.faults.services import OwnServices
from tests.service.harness import produce

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(300)
async def test_broker_down_for_20s_mid_stream(
    fault_env: dict[str, str],
    make_worker: Callable[..., FaultWorker],
    replay_dir: Path,
    control: Path,
    own_services: OwnServices,
    report: Callable[..., None],
) -> None:
    n, outage = 3000, 20.0
    env = fault_env
    bootstrap, verdicts = own_services.bootstrap, env["GUARDSTREAM_TOPIC_VERDICTS"]
    write_control(control, delay_s=0.1)  # ~300 verdicts/s: the outage lands mid-stream
    worker = make_worker(env)
    worker.start()
    async with Progress(bootstrap, verdicts) as progress:
        await produce(
            bootstrap,
            env["GUARDSTREAM_TOPIC_PROMPTS"],
            prompt_events(replay_samples(replay_dir), n),
        )
        await progress.reach(n // 5, timeout=60)
    before = progress.count
    stop_s = own_services.down("kafka")
    await asyncio.sleep(outage)
    assert worker.proc is not None and worker.proc.poll() is None, "the worker died"
    start_s = own_services.up("kafka")
    back = time.monotonic()
    got = await read_topic(bootstrap, verdicts, until=n, timeout=150, settle=3.0)
    all_after = time.monotonic() - back
    ids = [v["source_id"] for v in got]
    missing = {f"m{i}" for i in range(n)} - set(ids)
    ready_after: float | None = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if worker.ready():
            ready_after = time.monotonic() - back
            break
        await asyncio.sleep(0.5)
    report(
        messages=n,
        verdicts_before_outage=before,
        outage_s=round(outage + stop_s, 1),
        broker_restart_s=round(start_s, 1),
        lost=len(missing),
        duplicates=duplicates(ids),
        all_verdicts_after_broker_back_s=round(all_after, 1),
        ready_after_broker_back_s=ready_after and round(ready_after, 1),
    )
    assert not missing, f"{len(missing)} inputs without a verdict\n{worker.log_tail()}"
    assert worker.proc.poll() is None, "the worker exited"
    assert ready_after is not None, f"not ready again\n{worker.log_tail()}"


def _cache_metrics(text: str | None) -> dict[str, float]:
    if text is None:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("guardstream_cache"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


@pytest.mark.timeout(240)
async def test_redis_down_mid_stream(
    fault_env: dict[str, str],
    make_worker: Callable[..., FaultWorker],
    replay_dir: Path,
    own_services: OwnServices,
    report: Callable[..., None],
    unique: str,
) -> None:
    n = 300  # per wave; every wave carries the same texts, so a working cache answers waves 2+
    env = {
        **fault_env,
        "GUARDSTREAM_CACHE_ENABLED": "true",
        "GUARDSTREAM_MODEL_REVISION": f"rev-{unique}",  # a clean key space in this Redis
    }
    bootstrap, topic = own_services.bootstrap, env["GUARDSTREAM_TOPIC_PROMPTS"]
    verdicts = env["GUARDSTREAM_TOPIC_VERDICTS"]
    samples = replay_samples(replay_dir)[:n]
    worker = make_worker(env)
    worker.start()

    async def wave(k: int) -> list[dict[str, object]]:
        await produce(bootstrap, topic, prompt_events(samples, n, prefix=f"w{k}-"))
        got = await read_topic(bootstrap, verdicts, until=n * (k + 1), timeout=60, settle=0.5)
        return [v for v in got if str(v["source_id"]).startswith(f"w{k}-")]

    first = await wave(0)  # fills the cache
    metrics_up = _cache_metrics(worker.metrics())
    own_services.down("redis")
    down_at = time.monotonic()
    during = await wave(1)  # Redis gone: moderation goes on without the cache
    degraded_s = time.monotonic() - down_at
    metrics_down = _cache_metrics(worker.metrics())
    own_services.up("redis")  # an empty Redis (no persistence)

    async def cache_back() -> bool:  # the breaker closed again (the worker pings every 2 s)
        _status, body = worker.get("/readyz")
        return bool(body) and json.loads(body)["cache"]["state"] == "closed"

    assert await wait_for(cache_back, 60, interval=0.2), worker.log_tail()
    refill = await wave(2)  # misses, written to the new Redis
    after = await wave(3)  # served from it
    metrics_after = _cache_metrics(worker.metrics())
    log = worker.log_text()

    for batch in (first, during, refill, after):
        assert sorted(str(v["source_id"]) for v in batch) == sorted(
            {str(v["source_id"]) for v in batch}
        ), "one verdict per input"
        assert len(batch) == n
        assert all(v["verdict"]["engine_error"] is None for v in batch)  # type: ignore[index]
    assert not any(v["cached"] for v in during), "no cache while Redis is down"
    cached_after = sum(1 for v in after if v["cached"])
    # only trusted verdicts are cached (an untrusted one is generated again each time)
    trusted = sum(1 for v in refill if v["verdict"]["trusted"])  # type: ignore[index]
    report(
        messages=4 * n,
        lost=0,
        degraded_wave_s=round(degraded_s, 1),
        cached_in_first_wave=sum(1 for v in first if v["cached"]),
        cached_while_down=0,
        cached_after_return=cached_after,
        trusted_per_wave=trusted,
        metrics_seen=sorted(metrics_down),
    )
    assert 0 < trusted and cached_after > 0, "the cache is used again once Redis is back"
    assert not any(v["cached"] for v in after if not v["verdict"]["trusted"])  # type: ignore[index]
    assert "unavailable after" in log, "the log says the cache is degraded"
    assert "available again" in log
    assert "Traceback" not in log, log[-3000:]
    gauge = "guardstream_cache_degraded"
    if gauge in metrics_down:  # the cache metrics of service.telemetry, when they are there
        assert (metrics_up[gauge], metrics_down[gauge], metrics_after[gauge]) == (0, 1, 0)
        errors = "guardstream_cache_errors_total"
        assert metrics_down[errors] > metrics_up.get(errors, 0)
    # every trusted verdict of the refill wave was written to the new Redis and served from it
    # (before the one retry on a fresh connection: 4-47 of 300 lost on the pool's dead ones)
    assert cached_after == trusted, (cached_after, trusted)
