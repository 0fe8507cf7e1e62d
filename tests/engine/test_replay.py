"""engine.backends.replay: recorded outputs, looked up by the exact model input."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from engine.backends.base import Backend
from engine.backends.replay import ReplayBackend
from engine.prompt import EARLY_EXIT_STOP, build_model_input

#: The shared README: inputs shared by the two XSTest files whose recorded outputs differ.
XSTEST_CONFLICTS = {"1B": 113, "3B": 82, "8B": 78}


def _records(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


async def test_replays_every_recorded_output_of_a_file(shared_dir: Path) -> None:
    path = shared_dir / "predictions" / "8B" / "HarmBenchResponse.jsonl"
    backend = ReplayBackend(path)
    assert isinstance(backend, Backend)
    assert backend.name == "replay"
    assert backend.model_id == "GuardReasoner-replay"
    assert backend.files == (path,)
    records = _records(path)
    generations = await backend.generate([r["prompt"] for r in records], max_new_tokens=10_000)
    assert len(generations) == len(records)
    for record, generation in zip(records, generations, strict=True):
        assert generation.text == record["predict"]
        assert generation.finish_reason == "stop"
        assert generation.error is None
        assert generation.tokens == math.ceil(len(record["predict"]) / 4)


@pytest.mark.parametrize("size", sorted(XSTEST_CONFLICTS))
def test_folder_replay_chooses_the_first_file_for_xstest_duplicates(
    shared_dir: Path, size: str
) -> None:
    folder = shared_dir / "predictions" / size
    backend = ReplayBackend(folder)
    assert [f.name for f in backend.files] == sorted(p.name for p in folder.glob("*.jsonl"))
    assert len(backend.files) == 6
    assert backend.conflicts == XSTEST_CONFLICTS[size]
    harmful = {r["prompt"]: r["predict"] for r in _records(folder / "XSTestReponseHarmful.jsonl")}
    refusal = {r["prompt"]: r["predict"] for r in _records(folder / "XSTestResponseRefusal.jsonl")}
    differing = [p for p in harmful.keys() & refusal.keys() if harmful[p] != refusal[p]]
    assert len(differing) == XSTEST_CONFLICTS[size]
    for model_input in differing:
        assert backend.outputs[model_input] == harmful[model_input]


async def test_length_limit_cuts_the_text(shared_dir: Path) -> None:
    path = shared_dir / "predictions" / "1B" / "SimpleSafetyTests.jsonl"
    record = _records(path)[0]
    backend = ReplayBackend(path)
    [generation] = await backend.generate([record["prompt"]], max_new_tokens=10)
    assert generation.finish_reason == "length"
    assert generation.text == record["predict"][:40]
    assert generation.tokens == 10
    assert len(record["predict"]) > 40


async def test_a_miss_is_a_per_input_error_not_a_crash(shared_dir: Path) -> None:
    path = shared_dir / "predictions" / "1B" / "SimpleSafetyTests.jsonl"
    known = _records(path)[1]["prompt"]
    unknown = build_model_input("a prompt nobody recorded", None)
    backend = ReplayBackend(path)
    hit, miss = await backend.generate([known, unknown], max_new_tokens=4096)
    assert hit.finish_reason == "stop" and hit.text
    assert miss.finish_reason == "error"
    assert miss.text == ""
    assert miss.error is not None
    assert miss.error.startswith("no recorded output for this input")
    assert hashlib.sha256(unknown.encode()).hexdigest() in miss.error


def test_revision_is_a_content_hash_unless_given(shared_dir: Path) -> None:
    one = ReplayBackend(shared_dir / "predictions" / "1B")
    again = ReplayBackend(shared_dir / "predictions" / "1B")
    other = ReplayBackend(shared_dir / "predictions" / "3B")
    assert len(one.revision) == 12
    assert int(one.revision, 16) >= 0
    assert one.revision == again.revision != other.revision
    named = ReplayBackend(shared_dir / "predictions" / "1B", model_id="m", revision="r1")
    assert (named.model_id, named.revision) == ("m", "r1")


def test_revision_follows_the_content(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a", "predict": "b"}) + "\n", encoding="utf-8")
    before = ReplayBackend(path).revision
    path.write_text(json.dumps({"prompt": "a", "predict": "c"}) + "\n", encoding="utf-8")
    assert ReplayBackend(path).revision != before


def test_bad_paths_and_records_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ReplayBackend(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"no \*\.jsonl"):
        ReplayBackend(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "predict": "b"}\n{"prompt": "c"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        ReplayBackend(bad)


def test_line_separators_inside_json_strings_do_not_split_records(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    record = {"prompt": "a\u2028b\x85c", "predict": "d\u2029e"}
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    assert ReplayBackend(path).outputs == {record["prompt"]: record["predict"]}


# Stop strings -----------------------------------------------------------------------------------


async def test_stop_cuts_before_the_first_occurrence(shared_dir: Path) -> None:
    """Every recorded prompt output of a file, replayed with the early-exit stop string: the
    text before its first occurrence (left out), or the whole output where there is none."""
    path = shared_dir / "predictions" / "8B" / "AegisSafetyTest.jsonl"
    records = _records(path)
    backend = ReplayBackend(path)
    stops = [EARLY_EXIT_STOP] * len(records)
    generations = await backend.generate([r["prompt"] for r in records], 10_000, stops)
    whole = 0
    for record, generation in zip(records, generations, strict=True):
        output = record["predict"]
        at = output.find(EARLY_EXIT_STOP)
        expected = output if at < 0 else output[:at]
        whole += at < 0
        assert generation.text == expected
        assert EARLY_EXIT_STOP not in generation.text
        assert generation.finish_reason == "stop"
        assert generation.tokens == math.ceil(len(expected) / 4)
    assert 0 < whole < len(records)  # this file has outputs that never write "# Task 2"


async def test_stop_applies_per_input_and_before_the_length_cap(shared_dir: Path) -> None:
    path = shared_dir / "predictions" / "1B" / "SimpleSafetyTests.jsonl"
    first, second = _records(path)[:2]
    backend = ReplayBackend(path)
    inputs = [first["prompt"], second["prompt"]]
    stopped, unstopped = await backend.generate(inputs, 10_000, [EARLY_EXIT_STOP, None])
    assert stopped.text == first["predict"][: first["predict"].index(EARLY_EXIT_STOP)]
    assert unstopped.text == second["predict"]
    prefix = len(stopped.text)
    # a cap below the prefix still cuts it, and says so
    [capped] = await backend.generate([first["prompt"]], prefix // 8, [EARLY_EXIT_STOP])
    assert capped.finish_reason == "length"
    assert capped.text == first["predict"][: 4 * (prefix // 8)]
    # a cap between the prefix and the full output does not: the stop came first
    between = math.ceil(prefix / 4)
    assert between < math.ceil(len(first["predict"]) / 4)
    [fits] = await backend.generate([first["prompt"]], between, [EARLY_EXIT_STOP])
    assert (fits.text, fits.finish_reason) == (stopped.text, "stop")


async def test_malformed_stops_are_refused(shared_dir: Path) -> None:
    path = shared_dir / "predictions" / "1B" / "SimpleSafetyTests.jsonl"
    backend = ReplayBackend(path)
    prompt = _records(path)[0]["prompt"]
    with pytest.raises(ValueError, match="2 entries for 1 inputs"):
        await backend.generate([prompt], 100, [None, None])
    with pytest.raises(ValueError, match="must not be empty"):
        await backend.generate([prompt], 100, [""])
