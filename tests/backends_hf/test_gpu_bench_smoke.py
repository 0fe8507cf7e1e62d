"""The GPU bench runs end to end on CPU with a tiny random model and writes its JSON report."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.gpu.roofline import roofline
from bench.gpu.throughput import main, percentile


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
