"""`guardstream bench --scenarios utilisation --quick` end to end against the local Kafka and
Redis: a real worker on the simulated in-flight engine, per admission mode. Checks the table's
structure and that nothing is lost, not the figures (the machine is shared and noisy: they
belong in the bench's printed output)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def util_run(
    tmp_path_factory: pytest.TempPathFactory, shared_dir: Path, kafka_bootstrap: str, redis_url: str
) -> Path:
    out = tmp_path_factory.mktemp("bench-util")
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "bench",
        "--scenarios",
        "utilisation",
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


def _util(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "results.json").read_text())
    return dict(data["utilisation"])


def test_every_mode_has_a_row_per_load_and_the_engine_alone_too(util_run: Path) -> None:
    u = _util(util_run)
    assert u["preset"] == "8B-H100" and u["capacity"] > 0
    assert [m["mode"] for m in u["modes"]] == ["batch 32x2", "request 256"]
    assert [r["load"] for r in u["engine_alone"]] == u["loads"] == [0.5, 1.2]
    for row in u["engine_alone"]:
        assert row["undelivered"] == 0 and 0 < row["p50_ms"] <= row["p99_ms"]
    for mode in u["modes"]:
        assert [r["load"] for r in mode["rows"]] == u["loads"]
        for row, alone in zip(mode["rows"], u["engine_alone"], strict=True):
            assert row["events"] == alone["events"] > 0  # the same requests
            assert row["offered_rate"] == alone["offered_rate"]
            assert row["engine_p99_ms"] == alone["p99_ms"]
            assert 0 < row["p50_ms"] <= row["p99_ms"]
            if row["p99_guard_ms"] is not None:  # None: none of the level's verdicts came
                assert 0 < row["p99_guard_ms"] <= row["p99_ms"] * 1.01
            assert row["engine_done_rate"] >= 0
            assert row["delivered_rate"] >= 0
            assert row["ratio_capacity"] == pytest.approx(
                row["delivered_rate"] / u["capacity"], abs=1e-3
            )
            assert row["p99_ratio"] == pytest.approx(row["p99_ms"] / alone["p99_ms"], abs=1e-3)
        assert set(u["goals"][mode["mode"]]) == {
            "saturation_ratio",
            "saturation_met",
            "p99_ratio_at_50",
            "p99_met",
        }


def test_request_admission_loses_nothing(util_run: Path) -> None:
    u = _util(util_run)
    request = next(m for m in u["modes"] if m["mode"] == "request 256")
    sent = sum(r["events"] for r in request["rows"])
    assert request["sent"] == sent
    assert request["complete"] and request["delivered"] == sent  # a verdict for every event
    assert all(r["undelivered"] == 0 for r in request["rows"])
    # every event a cache miss (fresh salt): at least one model input each, each its own call
    assert request["model_inputs"] >= sent
    assert request["model_calls"] == request["model_inputs"]
    # the engine ran sequences; the worker's counters came through
    assert any(r["engine_mean_running"] > 0 for r in request["rows"])
    batch = next(m for m in u["modes"] if m["mode"] == "batch 32x2")
    assert batch["sent"] == sent and batch["delivered"] <= sent


def test_the_table_plot_and_csv_are_written(util_run: Path) -> None:
    text = (util_run / "results.md").read_text()
    assert "Engine utilisation" in text and "preset 8B-H100" in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0].split("|")[1].strip() == "mode"
    assert len(table) == 2 + 2 * 3  # header, rule; engine alone and two modes at two loads
    assert "goal >= 0.9" in text and "goal <= 1.5x" in text
    assert (util_run / "utilisation.png").read_bytes().startswith(b"\x89PNG")
    rows = (util_run / "utilisation.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 3
    assert "5. engine utilisation" in (util_run / "stdout.txt").read_text()
    assert "<shared>/predictions/8B" in (util_run / "results.json").read_text()
