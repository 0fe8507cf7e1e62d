"""The cascade's settings: a second model is configured as the first is, under ESCALATE_."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.cascade import DEFAULT_POLICY
from service.config import Settings, SettingsError
from service.factory import build_cascade


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    (tmp_path / "a.jsonl").write_text('{"prompt": "x", "predict": "y"}\n')
    monkeypatch.setenv("GUARDSTREAM_REPLAY_PATH", str(tmp_path))
    monkeypatch.setenv("GUARDSTREAM_ESCALATE_ENGINE", "replay")
    return monkeypatch


def test_each_missing_or_wrong_cascade_setting_is_named(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(SettingsError, match="GUARDSTREAM_ESCALATE_MODEL"):
        Settings.from_env()
    env.setenv("GUARDSTREAM_ESCALATE_MODEL", "yueliu1999/GuardReasoner-8B")
    with pytest.raises(SettingsError, match="GUARDSTREAM_ESCALATE_REPLAY_PATH"):
        Settings.from_env()
    env.setenv("GUARDSTREAM_ESCALATE_REPLAY_PATH", str(tmp_path))
    env.setenv("GUARDSTREAM_ESCALATE_POLICY", "untrusted,vibes")
    with pytest.raises(SettingsError, match=r"GUARDSTREAM_ESCALATE_POLICY.*vibes"):
        Settings.from_env()
    env.setenv("GUARDSTREAM_ESCALATE_ENGINE", "openai_http")
    env.delenv("GUARDSTREAM_ESCALATE_POLICY")
    with pytest.raises(SettingsError, match="GUARDSTREAM_ESCALATE_OPENAI_BASE_URL"):
        Settings.from_env()
    env.setenv("GUARDSTREAM_ESCALATE_OPENAI_BASE_URL", "http://big:8000/v1")
    with pytest.raises(SettingsError, match="GUARDSTREAM_ESCALATE_MODEL_REVISION"):
        Settings.from_env()


def test_the_second_model_is_built_from_its_own_settings(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    second = tmp_path / "second"
    second.mkdir()
    (second / "b.jsonl").write_text('{"prompt": "x", "predict": "z"}\n')
    env.setenv("GUARDSTREAM_ESCALATE_MODEL", "yueliu1999/GuardReasoner-8B")
    env.setenv("GUARDSTREAM_ESCALATE_REPLAY_PATH", str(second))
    env.setenv("GUARDSTREAM_ESCALATE_MAX_SEQUENCES", "12")
    settings = Settings.from_env()
    cascade = build_cascade(settings)
    assert cascade is not None
    assert cascade.backend.model_id == "yueliu1999/GuardReasoner-8B"
    assert cascade.policy == DEFAULT_POLICY and cascade.max_sequences == 12
    assert settings.model != cascade.backend.model_id
    assert build_cascade(Settings.from_env(escalate_engine=None)) is None
