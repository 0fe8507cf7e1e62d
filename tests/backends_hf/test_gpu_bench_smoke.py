"""The GPU benches run end to end on CPU with a tiny random model and write their JSON reports."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.gpu import early_exit
from bench.gpu.roofline import roofline
from bench.gpu.throughput import main, percentile
from engine.prompt import EARLY_EXIT_STOP


def test_tiny_cpu_run_writes_rows(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    new_tokens = 4
    main(
        [
            "--tiny",
            "--device", "cpu",
            "--batch-sizes", "1,2",
            "--new-tokens", str(new_tokens),
            "--rounds", "2",
            "--backends", "hf,trtllm",
            "--workdir", str(tmp_path),
            "--json", str(out),
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["backend"], r["batch_size"]) for r in rows] == [("hf", 1), ("hf", 2)]
    for r in rows:
        assert r["errors"] == 0 and r["messages"] == 2 * r["batch_size"]
        # EOS ignored: every message is exactly new_tokens long.
        assert r["generated_tokens"] == r["messages"] * new_tokens
        for key in ("msgs_per_s", "tok_per_s", "batch_p50_s", "batch_p99_s", "msg_p50_ms"):
            assert r[key] > 0, key
        assert r["batch_p50_s"] <= r["batch_p95_s"] <= r["batch_p99_s"]
        assert math.isclose(r["tok_per_s"], r["msgs_per_s"] * new_tokens, rel_tol=1e-9)
        assert r["roof_tok_s"] is None  # no bandwidth figure on CPU
    assert report["input_tokens"] > 100 and report["parameters"] > 0
    try:
        import tensorrt_llm  # noqa: F401
    except ImportError:
        assert [s["backend"] for s in report["skipped"]] == ["trtllm"]
    assert not any(p.name.startswith("gpu-bench-") for p in tmp_path.iterdir())  # cleaned up


def test_percentile_and_roofline_arithmetic() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0], 100) == 2.0 and percentile([5.0], 99) == 5.0
    # 2 GB of weights at 2 TB/s: 1 ms a step, so 1000 tok/s at batch 1 and 64000 at 64.
    r = roofline(2_000_000_000, 0, 0.0, 2e12, 64)
    assert r["roof_step_ms"] == 1.0 and r["roof_tok_s"] == 64000.0
    with_kv = roofline(2_000_000_000, 1_000_000, 1000.0, 2e12, 1)
    assert with_kv["roof_kv_tok_s"] is not None
    assert math.isclose(with_kv["roof_kv_tok_s"], 2e12 / 3e9)


# ---- bench.gpu.early_exit ---------------------------------------------------------------------

#: Packages of the service that the GPU machine does not have (it has torch, transformers and
#: tokenizers, no network): the early-exit bench must run without any of them.
NOT_ON_THE_GPU_MACHINE = (
    "faust",
    "mode",
    "aiokafka",
    "redis",
    "pydantic",
    "pydantic_settings",
    "opentelemetry",
    "tenacity",
    "confluent_kafka",
)
#: Runs the bench with those packages unimportable (None in sys.modules: import fails, find_spec
#: answers None, as for a package that is not installed).
_RUNNER = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None
from bench.gpu.early_exit import main
main(sys.argv[2:])
"""
ROW_KEYS = {
    "batch_size", "mode", "rounds", "verdicts", "errors", "stop_string_hits", "seconds",
    "prefill_s", "decode_s", "steps", "tokens", "mean_tokens", "input_width",
    "mean_input_tokens", "useful_fraction", "verdicts_per_s", "tok_per_s", "decode_tok_per_s",
    "decode_step_ms", "row_steps_per_s", "peak_gib", "roof_step_ms", "roof_row_steps_per_s",
    "roof_decode_tok_per_s", "roof_verdicts_per_s", "roof_fraction",
}  # fmt: skip


def test_early_exit_quick_run_writes_one_json_under_out(tmp_path: Path) -> None:
    """`--quick` on CPU, as the GPU machine would run it (no service packages, the report under
    $OUT): one JSON file whose rows hold what the recorded lengths say, in every field."""
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "HF_HUB_OFFLINE": "1"}
    argv = ["--quick", "--bandwidth-gb-s", "100", "--workdir", str(tmp_path)]
    began = time.monotonic()
    subprocess.run(
        [sys.executable, "-c", _RUNNER, ",".join(NOT_ON_THE_GPU_MACHINE), *argv],
        cwd=early_exit.REPO_ROOT, env=env, check=True, timeout=300,
    )  # fmt: skip
    assert time.monotonic() - began < 60, "--quick must stay well under a minute"
    assert [p.name for p in out.iterdir()] == [early_exit.JSON_NAME]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the model's folder is gone
    report = json.loads((out / early_exit.JSON_NAME).read_text())

    assert report["quick"] is True and report["complete"] is True and report["skipped"] == []
    assert report["device"] and report["dtype"] == "float32" and report["parameters"] > 0
    assert set(report["method"]) == {"lengths", "early_exit", "batching", "throughput", "roofline"}
    assert report["bandwidth_gb_s"] == 100 and report["bandwidth_source"].startswith("given")
    assert report["weight_bytes"] == 4 * report["parameters"] and report["kv_bytes_per_token"] > 0
    work = report["workload"]
    assert work["requests"] == 698 and work["chars_per_token"] == early_exit.CHARS_PER_TOKEN
    assert 0.3 < work["recorded_early_over_full"] < 0.5

    # What the run did, worked out again from the recorded lengths and the batch plan.
    args = early_exit.parse_args(argv)
    workload = early_exit.make_workload(args)
    plan = early_exit.plan_batches(len(workload.inputs), args.batch_sizes, 1, args.seed)
    rows = report["rows"]
    assert [(r["batch_size"], r["mode"]) for r in rows] == [
        (b, m) for b in early_exit.QUICK_BATCH_SIZES for m in early_exit.MODES
    ]
    by = {(r["batch_size"], r["mode"]): r for r in rows}
    for batch, [indices] in plan:
        for mode in early_exit.MODES:
            r = by[(batch, mode)]
            assert set(r) == ROW_KEYS
            targets = [workload.targets[mode][i] for i in indices]
            assert (r["verdicts"], r["errors"], r["stop_string_hits"]) == (batch, 0, 0)
            assert r["tokens"] == sum(targets) and r["steps"] == max(targets)
            assert r["useful_fraction"] == sum(targets) / (batch * max(targets))
            assert 0 < r["prefill_s"] < r["seconds"] and r["input_width"] > 100
            for key in ("verdicts_per_s", "tok_per_s", "roof_step_ms", "roof_verdicts_per_s"):
                assert r[key] > 0, key
            assert math.isclose(r["verdicts_per_s"], batch / r["seconds"])
            assert r["peak_gib"] is None  # CPU
        full, early = by[(batch, "full")], by[(batch, "early_exit")]
        assert early["tokens"] < full["tokens"] and early["steps"] < full["steps"]
    assert [c["batch_size"] for c in report["comparison"]] == early_exit.QUICK_BATCH_SIZES
    for c in report["comparison"]:
        full = by[(c["batch_size"], "full")]
        assert (
            c["verdicts_speedup"]
            == by[(c["batch_size"], "early_exit")]["verdicts_per_s"] / (full["verdicts_per_s"])
        )


def test_early_exit_roofline_arithmetic() -> None:
    """(weights + rows x (width + steps/2) x KV bytes) / bandwidth per decode step."""
    roof = early_exit.Roof(weight_bytes=2_000_000_000, kv_bytes_per_token=32768, bandwidth=4e12)
    step = roof.step_s(rows=64, width=200, steps=300)
    assert step is not None
    assert math.isclose(step, (2e9 + 64 * 350 * 32768) / 4e12)
    run = early_exit.Run(
        seconds=3.0, prefill_s=0.5, steps=301, tokens=64 * 200, width=200,
        input_tokens=64 * 150, stop_hits=0, errors=0, peak_bytes=None,
    )  # fmt: skip
    row = early_exit.summarize(64, "full", [run], roof)
    roof_decode = 300 * (2e9 + 64 * (200 + 301 / 2) * 32768) / 4e12
    assert math.isclose(row["roof_fraction"], roof_decode / 2.5)
    assert math.isclose(row["roof_verdicts_per_s"], 64 / (0.5 + roof_decode))
    assert math.isclose(row["decode_step_ms"], 2.5 / 300 * 1000)
    assert math.isclose(row["decode_tok_per_s"], (64 * 200 - 64) / 2.5)
    assert early_exit.Roof(1, 1, None).step_s(1, 1, 1) is None


def test_recorded_lengths_file_is_derived_from_the_shared_outputs(shared_dir: Path) -> None:
    """bench/gpu/recorded_lengths_1b.json (what the GPU machine, without the shared folder,
    reads) holds exactly the lengths of the shared recorded outputs."""
    pairs = early_exit.read_predictions(shared_dir / "predictions" / "1B")
    assert early_exit.read_lengths(early_exit.LENGTHS_FILE) == early_exit.recorded_lengths(pairs)
    stops = [out.find(EARLY_EXIT_STOP) for _, out in pairs]
    assert len(pairs) == 698 and sum(s < 0 for s in stops) == 2


def test_without_the_shared_folder_the_same_lengths_and_inputs_of_their_length(
    shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = early_exit.parse_args([])
    with_shared = early_exit.make_workload(args)
    monkeypatch.setenv("GUARDSTREAM_SHARED_DIR", str(shared_dir / "absent"))
    without = early_exit.make_workload(args)
    assert without.targets == with_shared.targets
    assert [len(t) for t in without.inputs] == [len(t) for t in with_shared.inputs]
    assert without.about["lengths_source"] == "bench/gpu/recorded_lengths_1b.json"
    assert all(t.endswith("\n\nAI assistant:\nNone\n\n") for t in without.inputs)
    assert with_shared.about["capped"] == 1 and max(with_shared.targets["full"]) == 1024
