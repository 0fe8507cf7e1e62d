"""Fixtures of the backend tests: the recording stand-in for tensorrt_llm."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.backends.fake_trtllm import Recorder, build_modules


@pytest.fixture
def make_trtllm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., Recorder]:
    """Install a fake tensorrt_llm (and torch.cuda) in sys.modules; returns its recorder.

    PATH is emptied so that no real nvidia-smi answers for the GPU."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))

    def make(**settings: Any) -> Recorder:
        rec = Recorder(**settings)
        for name, module in build_modules(rec).items():
            monkeypatch.setitem(sys.modules, name, module)
        return rec

    return make


@pytest.fixture
def trtllm(make_trtllm: Callable[..., Recorder]) -> Recorder:
    """The fake at tensorrt_llm 1.2.1 on an H100."""
    return make_trtllm()


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A Hugging Face checkpoint folder (tiny placeholder weights)."""
    path = tmp_path / "GuardReasoner-1B"
    path.mkdir()
    (path / "config.json").write_text(
        '{"_name_or_path": "yueliu1999/GuardReasoner-1B", "architectures": ["LlamaForCausalLM"]}'
    )
    (path / "model.safetensors").write_bytes(b"\0" * 128)
    (path / "tokenizer.json").write_text("{}")
    return path
