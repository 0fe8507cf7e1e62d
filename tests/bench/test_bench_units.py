"""The bench's parts that need no broker: statistics, tables, input streams, the model
stand-ins, the latency split and the CLI's options."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bench import cli
from bench.backends import Counting, HashReplayBackend, StandInBackend
from bench.data import Message, recorded_outputs, repeat_stream, unique_stream
from bench.kafka_io import Received
from bench.report import table
from bench.scenarios import _split
from bench.stats import median, percentile
from engine.backends.base import Generation
from engine.backends.replay import approx_tokens
from engine.parser import parse

PROMPTS = [f"prompt number {i}" for i in range(200)]


def test_percentile_interpolates_and_orders() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 5.0
    assert median(values) == 3.0
    assert percentile([0.0, 10.0], 25) == pytest.approx(2.5)
    data = [float(x * x) for x in range(1000)]
    assert percentile(data, 50) <= percentile(data, 95) <= percentile(data, 99)


def test_table_aligns_columns_and_marks_missing() -> None:
    text = table(["a", "long header"], [[1, None], [12345.6, 0.25]])
    lines = text.splitlines()
    assert lines[0].startswith("| a ")
    assert len({len(line) for line in lines}) == 1  # every line equally wide
    assert "12,346" in text and "0.25" in text and " - " in text


def test_unique_stream_never_repeats_a_text_or_key() -> None:
    messages = unique_stream(PROMPTS, 1000, "r1")
    assert len({m.text for m in messages}) == 1000
    assert len({m.key for m in messages}) == 1000
    assert messages[0].text == PROMPTS[0]  # the benchmark text itself first
    assert messages[200].text == f"{PROMPTS[0]} (#1)"


def test_repeat_stream_repeats_about_the_fraction_asked() -> None:
    messages = repeat_stream(PROMPTS, 4000, "r2", 0.5)
    hot = set(PROMPTS[-50:])
    share = sum(m.text in hot for m in messages) / len(messages)
    assert 0.45 < share < 0.55
    fresh = [m.text for m in messages if m.text not in hot]
    assert len(fresh) == len(set(fresh))  # the rest never repeat
    assert not any(m.text in hot for m in repeat_stream(PROMPTS, 500, "r3", 0.0))


def test_message_value_is_a_prompt_event_stamped_at_send_time() -> None:
    before = datetime.now(UTC)
    event = json.loads(Message("id-1", b"conv-1", "hello").value())
    assert event["id"] == "id-1" and event["conversation_id"] == "conv-1"
    assert event["text"] == "hello"
    assert datetime.fromisoformat(event["created_at"]) >= before


def test_hash_replay_answers_any_input_with_a_recorded_output(shared_dir: Path) -> None:
    outputs = recorded_outputs(shared_dir / "predictions" / "1B")
    backend = HashReplayBackend(outputs)
    gens = asyncio.run(backend.generate(["never recorded a", "never recorded b", "x"], 4096))
    assert all(g.text in outputs and g.finish_reason == "stop" for g in gens)
    again = asyncio.run(backend.generate(["never recorded a"], 4096))
    assert again[0].text == gens[0].text  # the same input, the same output
    assert parse(gens[0].text, has_response=False).found != "unparsed"
    cut = asyncio.run(backend.generate(["never recorded a"], 5))[0]
    assert cut.finish_reason == "length" and len(cut.text) <= 20


def test_stand_in_sleeps_its_cost_and_counting_counts() -> None:
    inner = StandInBackend(["Answers:\nRequest: harmful"], a_ms=40, b_ms=10)
    backend = Counting(inner, salt="s1")
    assert backend.revision == f"{inner.revision}+bench-s1"
    assert inner.cost_ms(3) == 70
    began = time.perf_counter()
    gens = asyncio.run(backend.generate(["a", "b", "c"], 100))
    took = (time.perf_counter() - began) * 1000
    assert len(gens) == 3
    assert 65 <= took < 400
    asyncio.run(backend.generate(["d"], 100))
    assert (backend.stats.calls, backend.stats.inputs, backend.stats.max_batch) == (2, 4, 3)


def test_split_attributes_the_latency_to_its_parts() -> None:
    created = datetime(2026, 1, 1, tzinfo=UTC)
    produced = created + timedelta(milliseconds=700)
    event = {
        "event_time": created.isoformat(),
        "produced_at": produced.isoformat(),
        "latency_ms": 650.0,
    }
    rec = Received(
        b"k",
        at=(created + timedelta(milliseconds=730)).timestamp(),
        value=json.dumps(event).encode(),
        headers={"guardstream-batch-wait-ms": b"20.0", "guardstream-generate-ms": b"600.0"},
    )
    parts = _split({b"k": rec})
    assert parts["e2e"] == [pytest.approx(730)]
    assert parts["batch_wait"] == [20.0] and parts["model"] == [600.0]
    assert parts["worker"] == [pytest.approx(30)]
    assert parts["inbound"] == [pytest.approx(50)]
    assert parts["outbound"] == [pytest.approx(30)]
    assert parts["overhead"] == [pytest.approx(110)]


def test_quick_overrides_only_what_was_left_at_its_default() -> None:
    args = cli.build_parser().parse_args(["--quick", "--n", "777"])
    cli.apply_quick(args)
    assert args.n == 777  # given on the command line: kept
    assert args.rounds == cli.QUICK["rounds"]
    assert args.cost_a_ms == cli.QUICK["cost_a_ms"]
    full = cli.build_parser().parse_args([])
    assert full.n == 20_000 and full.rounds >= 3


def test_guardstream_bench_is_a_subcommand() -> None:
    from service.cli import build_parser

    args = build_parser().parse_args(["bench", "--quick", "--scenarios", "overhead"])
    assert args.quick and args.scenarios == "overhead"
    assert args.func.__module__ == "service.commands.bench_cmd"


def test_portable_rewrites_only_paths_under_the_places(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    meta = {
        "env": {"OUTPUTS": f"{shared}/predictions/1B", "OTHER": f"{tmp_path}/sharedx/y"},
        "argv": ["--out", str(tmp_path / "out"), "--n", "5"],
        "n": 5,
    }
    got = cli.portable(meta, {shared: "<shared>", tmp_path / "out": "."})
    link = tmp_path / "link"
    link.symlink_to(shared, target_is_directory=True)
    assert cli.portable(f"{link}/a", {link: "<shared>"}) == "<shared>/a"  # the path as given
    assert got == {
        "env": {"OUTPUTS": "<shared>/predictions/1B", "OTHER": f"{tmp_path}/sharedx/y"},
        "argv": ["--out", ".", "--n", "5"],
        "n": 5,
    }


def test_hash_replay_stops_before_the_stop_string() -> None:
    text = "# Task 1\nRequest: harmful\n# Task 2\nResponse: harmful\n"
    backend = HashReplayBackend([text])
    gens = asyncio.run(backend.generate(["a", "b", "c"], 4096, ["\n# Task 2", None, "absent"]))
    assert gens[0] == Generation("# Task 1\nRequest: harmful", approx_tokens(text[:34]), "stop")
    assert gens[1].text == text and gens[2].text == text  # no stop, or a stop it never writes
    assert all(g.finish_reason == "stop" for g in gens)
    capped = backend.answer("a", 3, "\n# Task 2")  # the cap comes first: cut there
    assert capped == Generation(text[:12], 3, "length")
