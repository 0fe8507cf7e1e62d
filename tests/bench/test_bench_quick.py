"""`guardstream bench --quick` end to end against the local Kafka and Redis: every number is
produced and sane (not fast: that is what the full bench is for), and the plots are written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(
    tmp_path_factory: pytest.TempPathFactory, shared_dir: Path, kafka_bootstrap: str, redis_url: str
) -> Path:
    out = tmp_path_factory.mktemp("bench")
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "bench",
        "--quick",
        "--no-progress",
        "--out",
        str(out),
        "--shared",
        str(shared_dir),
        "--bootstrap",
        kafka_bootstrap,
        "--redis-url",
        redis_url,
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out


def _results(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "results.json").read_text())
    return data


def test_overhead_rates_and_ratio(quick_run: Path) -> None:
    o = _results(quick_run)["overhead"]
    for name in ("baseline", "faust floor", "worker cache off", "worker cache on"):
        rows = o["runs"][name]
        assert rows, name
        for row in rows:
            assert row["complete"], (name, row)
            assert row["messages"] == o["n"]
            assert row["rate"] > 0
            assert row["cpu_us_per_msg"] > 0
    assert 0 < o["ratio_cache_off"] < 10
    assert 0 < o["ratio_cache_on"] < 10
    assert 0 < o["ratio_faust_floor"] < 10
    # a figure, not a target: how far it is from 1 is the bench's to print (these machines are
    # shared and noisy; a bound here failed a run at 2.08 where bench/results gives 0.41)
    assert o["ratio_cache_off_to_floor"] > 0


def test_latency_percentiles_are_ordered(quick_run: Path) -> None:
    lat = _results(quick_run)["latency"]
    assert lat["capacity"] > 0
    assert [row["load"] for row in lat["rows"]] == [0.1, 0.5, 0.9]
    for row in lat["rows"]:
        assert row["samples"] > 0 and row["complete"]
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["achieved_rate"] > 0 and row["model_calls"] > 0
        # the stand-in sleeps at least its fixed cost: the model part can not be below it
        assert row["mean_ms"]["model"] >= 100 * 0.95
        assert row["mean_ms"]["e2e"] >= row["mean_ms"]["model"]
    rates = [row["offered_rate"] for row in lat["rows"]]
    assert rates == sorted(rates)


def test_batching_sweep_has_a_row_per_configuration(quick_run: Path) -> None:
    b = _results(quick_run)["batching"]
    sizes = {(r["max_batch_size"], r["max_wait_ms"]) for r in b["rows"]}
    assert {(32, 20.0), (4, 20.0), (32, 5.0)} <= sizes
    for row in b["rows"]:
        assert row["capacity"] > 0
        if not row["overloaded"]:
            assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    small = next(r for r in b["rows"] if r["max_batch_size"] == 4)
    big = next(r for r in b["rows"] if r["max_batch_size"] == 32 and r["max_wait_ms"] == 20.0)
    assert small["capacity"] < big["capacity"]  # the stand-in's fixed cost favours big batches


def test_repeats_avoid_model_calls(quick_run: Path) -> None:
    rows = _results(quick_run)["cache"]["rows"]
    fresh = next(r for r in rows if r["repeat_fraction"] == 0)
    repeats = next(r for r in rows if r["repeat_fraction"] > 0)
    assert fresh["drained"] and repeats["drained"]
    assert fresh["model_calls_avoided"] == 0  # distinct texts: every one is a model call
    assert repeats["model_calls_avoided"] > 0
    assert repeats["cache"] and 0 < repeats["cache_hits"] <= repeats["model_calls_avoided"]
    # about half the stream repeats a hot text: most of those are answered without the model
    assert 0.25 < repeats["avoided_fraction"] < 0.6
    assert repeats["rate"] > 0 and fresh["rate"] > 0


def test_outputs_written(quick_run: Path) -> None:
    for name in ("overhead.png", "latency.png", "batching.png", "cache.png"):
        data = (quick_run / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
    text = (quick_run / "results.md").read_text()
    assert "Pipeline overhead" in text and "p99 ms" in text
    assert "ratio worker/baseline" in (quick_run / "stdout.txt").read_text()
    meta = _results(quick_run)["meta"]
    assert meta["quick"] and meta["machine"]["nproc"] >= 1
    # committed results name no path of the machine that made them
    outputs = meta["plan"]["model_env"]["GUARDSTREAM_BENCH_OUTPUTS"]
    assert outputs.startswith("<shared>/"), outputs
    assert str(Path.cwd().resolve()) not in (quick_run / "results.json").read_text()
