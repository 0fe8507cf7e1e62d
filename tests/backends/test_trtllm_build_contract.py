"""Contract tests of `guardstream engine build` (engine/trtllm_build.py) against a recording fake.

TensorRT-LLM cannot run here; these tests check that every CLI option reaches the argument name
TensorRT-LLM documents for the engine path of 1.0-1.2.x, and that the build refuses clearly where
it cannot work. Names checked against (see also test_trtllm_contract.py):

- `tensorrt_llm/_tensorrt_engine/llm.py` (NVIDIA/TensorRT-LLM 1.x): `LLM(model, ...,
  tensor_parallel_size, dtype, **kwargs)` and `LLM.save(engine_dir)`;
  `tensorrt_llm/llmapi/llm_args.py` (1.x) `TrtLlmArgs.build_config / quant_config /
  calib_config` and `BuildConfig(max_batch_size, max_input_len, max_seq_len, max_num_tokens)`.
- https://nvidia.github.io/TensorRT-LLM/llm-api/reference/QuantConfig.html (`quant_algo`,
  `kv_cache_quant_algo`, `QuantAlgo.FP8`).
- https://nvidia.github.io/TensorRT-LLM/1.3.0rc27/llm-api/reference/CalibConfig.html
  (`calib_dataset`: "name or local path", default the hub dataset 'cnn_dailymail').
- https://nvidia.github.io/TensorRT-LLM/legacy/tensorrt-backend-removal.html (no engine path
  from 1.3; the PyTorch backend replaces it).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.trtllm_manifest import MANIFEST_NAME, checkpoint_checksum
from service.cli import main
from tests.backends.fake_trtllm import QuantAlgo, Recorder

MODEL = "yueliu1999/GuardReasoner-1B"


def build_cli(checkpoint: Path, output: Path, *extra: str) -> int:
    return main(
        ["engine", "build", "--checkpoint", str(checkpoint), "--output", str(output), *extra]
    )


def test_build_maps_every_cli_option_to_the_documented_argument(
    trtllm: Recorder, checkpoint: Path, tmp_path: Path
) -> None:
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"text": "hello"}\n')
    out = tmp_path / "engine"
    rc = build_cli(checkpoint, out, "--dtype", "float16", "--quantization", "fp8",
                   "--calib-dataset", str(calib), "--max-batch-size", "32",
                   "--max-num-tokens", "4096", "--max-seq-len", "3072", "--max-input-len", "2048",
                   "--tp", "2")  # fmt: skip
    assert rc == 0
    [llm] = trtllm.named("_tensorrt_engine.LLM")
    assert not trtllm.named("LLM"), "the PyTorch LLM rejects build_config: engine class only"
    assert llm.kwargs["model"] == str(checkpoint)
    assert llm.kwargs["dtype"] == "float16"
    assert llm.kwargs["tensor_parallel_size"] == 2
    assert llm.kwargs["build_config"].kwargs == {
        "max_batch_size": 32, "max_num_tokens": 4096, "max_seq_len": 3072, "max_input_len": 2048,
    }  # fmt: skip
    assert llm.kwargs["quant_config"].kwargs == {
        "quant_algo": QuantAlgo.FP8, "kv_cache_quant_algo": QuantAlgo.FP8,
    }  # fmt: skip
    assert llm.kwargs["calib_config"].kwargs == {"calib_dataset": str(calib)}
    [save] = trtllm.named("_tensorrt_engine.LLM.save")
    assert save.kwargs == {"engine_dir": str(out)}
    assert trtllm.named("_tensorrt_engine.LLM.shutdown"), "the CLI frees the GPU when done"


def test_build_writes_a_manifest_of_what_it_was_built_from(
    trtllm: Recorder, checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "engine"
    assert build_cli(checkpoint, out) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["model_id"] == MODEL
    assert manifest["tensorrt_llm_version"] == "1.2.1"
    assert manifest["gpu_name"] == "NVIDIA H100 80GB HBM3"
    assert manifest["checkpoint_checksum"] == checkpoint_checksum(checkpoint)
    assert manifest["build"] == {
        "dtype": "bfloat16", "quantization": "none", "max_batch_size": 64,
        "max_num_tokens": 8192, "max_seq_len": 4096, "max_input_len": None,
        "tensor_parallel_size": 1, "calib_dataset": None,
    }  # fmt: skip
    [llm] = trtllm.named("_tensorrt_engine.LLM")
    assert "quant_config" not in llm.kwargs and "calib_config" not in llm.kwargs
    # TensorRT-LLM's max_input_len default (1024) is too small: it follows max_seq_len.
    assert llm.kwargs["build_config"].kwargs["max_input_len"] == 4096


def test_checkpoint_checksum_follows_config_and_weight_sizes(checkpoint: Path) -> None:
    before = checkpoint_checksum(checkpoint)
    (checkpoint / "tokenizer.json").write_text('{"changed": true}')
    assert checkpoint_checksum(checkpoint) == before, "only config and weights count"
    (checkpoint / "model.safetensors").write_bytes(b"\0" * 129)
    after = checkpoint_checksum(checkpoint)
    assert after != before
    (checkpoint / "config.json").write_text('{"_name_or_path": "other"}')
    assert checkpoint_checksum(checkpoint) != after


def test_fp8_without_a_local_calibration_set_is_refused(
    trtllm: Recorder, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert build_cli(checkpoint, tmp_path / "e", "--quantization", "fp8") == 2
    err = capsys.readouterr().err
    assert "--calib-dataset" in err and "cnn_dailymail" in err
    assert trtllm.calls == []


def test_build_on_tensorrt_llm_1_3_names_the_pytorch_runtime(
    make_trtllm: Callable[..., Recorder],
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rec = make_trtllm(version="1.3.0rc21")
    assert build_cli(checkpoint, tmp_path / "e") == 2
    err = capsys.readouterr().err
    assert "1.3" in err and "PyTorch runtime" in err and "GUARDSTREAM_TRTLLM_RUNTIME=pytorch" in err
    assert rec.calls == []


def test_build_without_a_gpu_is_refused(
    make_trtllm: Callable[..., Recorder],
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rec = make_trtllm(gpu_name=None)
    assert build_cli(checkpoint, tmp_path / "e") == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert rec.calls == []


def test_build_without_tensorrt_llm_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch,
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    assert build_cli(checkpoint, tmp_path / "e") == 2
    err = capsys.readouterr().err
    assert "guardstream[trtllm]" in err and "container" in err


def test_build_refuses_a_non_empty_output_unless_forced(
    trtllm: Recorder, checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "engine"
    out.mkdir()
    (out / "something").write_text("x")
    assert build_cli(checkpoint, out) == 2
    assert build_cli(checkpoint, out, "--force") == 0
