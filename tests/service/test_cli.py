"""The CLI's engine-only commands: `moderate` (JSONL in/out), `schemas export`, and `serve`'s
refusal of bad settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import main
from tests.conftest import REPO_ROOT
from tests.service.conftest import samples


def test_moderate_jsonl_in_order_with_errors(
    shared_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = samples(shared_dir, "1B", "HarmBenchResponse")[:5]
    lines = [json.dumps({"prompt": r["prompt"], "response": r["response"]}) for r in rows]
    lines.insert(2, "not json")
    lines.append(json.dumps({"prompt": rows[0]["prompt"], "response": rows[0]["response"]}))
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("GUARDSTREAM_MAX_NEW_TOKENS", "4096")
    rc = main(["moderate", str(src), "--replay", str(shared_dir / "predictions" / "1B")])
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 1  # one bad line
    assert [o["line"] for o in out] == list(range(1, 8))
    assert "error" in out[2] and "JSON" in out[2]["error"]
    good = [o for o in out if "verdict" in o]
    assert len(good) == 6
    assert all(o["verdict"]["response"] in ("harmful", "unharmful") for o in good)
    gold = [r["label"] for r in rows]
    # The replayed verdicts are the model's: most agree with the gold label on this set.
    agree = sum(o["verdict"]["response"] == g for o, g in zip(good[:5], gold, strict=True))
    assert agree >= 3
    assert good[-1]["verdict"] == good[0]["verdict"]  # the repeated request: same verdict


def test_schemas_export_writes_valid_json_schema(tmp_path: Path) -> None:
    assert main(["schemas", "export", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "dead_letter.schema.json",
        "prompt_event.schema.json",
        "response_event.schema.json",
        "verdict_event.schema.json",
    ]
    verdict = json.loads((tmp_path / "verdict_event.schema.json").read_text())
    assert "event_id" in verdict["required"]
    assert verdict["properties"]["kind"]["enum"] == ["prompt", "response"]


def test_serve_refuses_a_bad_setting_naming_it() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve"],
        cwd=REPO_ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "GUARDSTREAM_ENGINE": "replay",
            "GUARDSTREAM_BATCH_MAX_WAIT_MS": "-5",
            "GUARDSTREAM_REPLAY_PATH": "x",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "GUARDSTREAM_BATCH_MAX_WAIT_MS" in proc.stderr


def test_committed_json_schemas_are_current(tmp_path: Path) -> None:
    """schemas/json/ (linked from the README) is what the models generate: never hand-edited."""
    main(["schemas", "export", str(tmp_path)])
    committed = REPO_ROOT / "schemas" / "json"
    for fresh in tmp_path.iterdir():
        assert (committed / fresh.name).read_text() == fresh.read_text(), (
            f"schemas/json/{fresh.name} is stale: run `make schemas`"
        )
