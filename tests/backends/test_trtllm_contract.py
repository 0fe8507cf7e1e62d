"""Contract tests of the `trtllm` backend and `guardstream engine build` against a recording fake.

tensorrt_llm cannot run here (no GPU, no wheel for CPython 3.11), so these tests check the calls
and argument names the backend makes against what TensorRT-LLM documents, for the versions the
project supports: the engine path on 1.0-1.2.x (last stable with engines: 1.2.1), the PyTorch
path on 1.x. Names checked against:

- `tensorrt_llm/_tensorrt_engine/__init__.py` and `_tensorrt_engine/llm.py` (NVIDIA/TensorRT-LLM,
  1.x): `LLM(model, tokenizer=None, ..., tensor_parallel_size=1, dtype="auto", ..., **kwargs)`,
  `LLM.save(engine_dir)`.
- `tensorrt_llm/llmapi/llm_args.py` (1.x) `TrtLlmArgs`: `build_config`, `quant_config`,
  `calib_config`; `init_build_config` builds `BuildConfig(max_batch_size, max_num_tokens,
  max_seq_len, max_beam_width, max_input_len)`; with an engine, runtime `max_seq_len` /
  `max_input_len` are overridden by the engine's build config (hence set at build time).
- https://nvidia.github.io/TensorRT-LLM/llm-api/reference/SamplingParams.html: `max_tokens`
  (default 32), `temperature`, `top_k`.
- https://nvidia.github.io/TensorRT-LLM/llm-api/reference/KvCacheConfig.html:
  `enable_block_reuse`, `free_gpu_memory_fraction` (default 0.9).
- https://nvidia.github.io/TensorRT-LLM/llm-api/reference/QuantConfig.html: `quant_algo`,
  `kv_cache_quant_algo`; https://nvidia.github.io/TensorRT-LLM/1.3.0rc27/llm-api/reference/
  CalibConfig.html: `calib_dataset` ("name or local path", default 'cnn_dailymail').
- https://nvidia.github.io/TensorRT-LLM/llm-api-examples/llm_generate_async.html:
  `await llm.generate_async(prompt, sampling_params)`; `tensorrt_llm/executor/result.py`:
  `CompletionOutput.text/token_ids/finish_reason` ('stop'|'length'|'timeout'|'cancelled'),
  `GenerationResult.aresult()/abort()/finished`.
- https://nvidia.github.io/TensorRT-LLM/legacy/tensorrt-backend-removal.html: the engine
  backend is gone from 1.3; PyTorch is the replacement.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.backends.base import BackendError
from engine.backends.trtllm import TrtllmBackend
from engine.retry import RetryPolicy
from engine.retry import generate as generate_with_retries
from engine.trtllm_manifest import MANIFEST_NAME, TrtllmSetupError
from tests.backends.fake_trtllm import Recorder
from tests.backends.test_trtllm_build_contract import MODEL, build_cli


def build_ok(checkpoint: Path, output: Path) -> None:
    assert build_cli(checkpoint, output) == 0


def engine_backend(engine_dir: Path, **kwargs: object) -> TrtllmBackend:
    return TrtllmBackend(MODEL, "r1", engine_dir=engine_dir, **kwargs)  # type: ignore[arg-type]


# --- backend start: engine runtime ------------------------------------------------------------


async def test_engine_runtime_loads_the_engine_off_the_loop_with_block_reuse(
    trtllm: Recorder, checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "engine"
    build_ok(checkpoint, out)
    trtllm.calls.clear()
    backend = engine_backend(out, checkpoint_dir=checkpoint, max_batch_size=32)
    await backend.start()
    [llm] = trtllm.named("_tensorrt_engine.LLM")
    assert llm.kwargs["model"] == str(out)
    assert "build_config" not in llm.kwargs, "a built engine is loaded, not rebuilt"
    assert llm.kwargs["max_batch_size"] == 32
    assert not llm.on_main_thread, "LLM() blocks for long: it must run in a worker thread"
    [kv] = trtllm.named("KvCacheConfig")
    assert kv.kwargs == {"enable_block_reuse": True, "free_gpu_memory_fraction": 0.85}
    assert llm.kwargs["kv_cache_config"].kwargs == kv.kwargs
    await backend.close()
    assert trtllm.named("_tensorrt_engine.LLM.shutdown")


async def test_pytorch_runtime_loads_the_checkpoint_without_engine_arguments(
    make_trtllm: Callable[..., Recorder], checkpoint: Path
) -> None:
    rec = make_trtllm(version="1.4.0rc1")  # no engine path at all: the PyTorch runtime still runs
    backend = TrtllmBackend(
        MODEL, "r1", checkpoint_dir=checkpoint, runtime="pytorch", max_seq_len=6144
    )
    await backend.start()
    [llm] = rec.named("LLM")
    assert llm.kwargs["model"] == str(checkpoint)
    assert llm.kwargs["max_seq_len"] == 6144 and llm.kwargs["max_input_len"] == 6144
    assert not (set(llm.kwargs) & {"build_config", "quant_config", "calib_config"})
    assert not llm.on_main_thread


async def test_without_a_configured_revision_it_is_the_engines_and_follows_a_rebuild(
    trtllm: Recorder, checkpoint: Path, tmp_path: Path
) -> None:
    """The revision keys the verdict cache: an engine rebuilt (here: its files change, as a new
    build's do) must get another one, so that it never reads the old engine's verdicts; a
    configured revision is kept as given; the PyTorch runtime takes the checkpoint's digest."""
    out = tmp_path / "engine"
    build_ok(checkpoint, out)
    first = TrtllmBackend(MODEL, None, engine_dir=out, checkpoint_dir=checkpoint)
    await first.start()
    assert first.revision.startswith("trt:sha256:")
    engine_file = next(p for p in sorted(out.iterdir()) if p.name != MANIFEST_NAME)
    engine_file.write_bytes(engine_file.read_bytes() + b"rebuilt")
    second = TrtllmBackend(MODEL, None, engine_dir=out, checkpoint_dir=checkpoint)
    await second.start()
    assert second.revision.startswith("trt:sha256:") and second.revision != first.revision
    given = engine_backend(out, checkpoint_dir=checkpoint)
    await given.start()
    assert given.revision == "r1"
    torch_path = TrtllmBackend(MODEL, None, checkpoint_dir=checkpoint, runtime="pytorch")
    await torch_path.start()
    assert torch_path.revision.startswith("sha256:")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"version": "1.1.0"}, "built with tensorrt_llm 1.2.1, installed is 1.1.0"),
        ({"gpu_name": "NVIDIA A100-SXM4-80GB"}, "this GPU is 'NVIDIA A100-SXM4-80GB'"),
    ],
)
async def test_an_engine_from_another_version_or_gpu_is_refused_with_the_rebuild_command(
    make_trtllm: Callable[..., Recorder],
    checkpoint: Path,
    tmp_path: Path,
    change: dict[str, str],
    expected: str,
) -> None:
    make_trtllm()
    out = tmp_path / "engine"
    assert build_cli(checkpoint, out, "--max-batch-size", "16") == 0
    rec = make_trtllm(**change)
    with pytest.raises(TrtllmSetupError) as info:
        await engine_backend(out, checkpoint_dir=checkpoint).start()
    message = str(info.value)
    assert expected in message and "rebuild" in message
    assert (
        f"guardstream engine build --checkpoint {checkpoint} --output {out} --dtype bfloat16 "
        "--quantization none --max-batch-size 16 " in message
    )
    assert rec.named("_tensorrt_engine.LLM") == []


async def test_a_changed_checkpoint_is_refused(
    trtllm: Recorder, checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "engine"
    build_ok(checkpoint, out)
    (checkpoint / "model.safetensors").write_bytes(b"\1" * 256)
    with pytest.raises(TrtllmSetupError, match=r"changed since the build.*rebuild"):
        await engine_backend(out, checkpoint_dir=checkpoint).start()


async def test_an_engine_without_manifest_is_refused(trtllm: Recorder, tmp_path: Path) -> None:
    out = tmp_path / "engine"
    out.mkdir()
    (out / "rank0.engine").write_bytes(b"x")
    with pytest.raises(TrtllmSetupError, match=f"no {MANIFEST_NAME}.*guardstream engine build"):
        await engine_backend(out).start()


async def test_build_on_start_builds_a_missing_or_stale_engine(
    make_trtllm: Callable[..., Recorder], checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "engine"
    rec = make_trtllm(version="1.1.0")
    backend = engine_backend(out, checkpoint_dir=checkpoint, build_on_start=True)
    await backend.start()
    [llm] = rec.named("_tensorrt_engine.LLM")
    assert llm.kwargs["model"] == str(checkpoint) and "build_config" in llm.kwargs
    assert "kv_cache_config" in llm.kwargs, "the built LLM is served directly, not reloaded"
    assert json.loads((out / MANIFEST_NAME).read_text())["tensorrt_llm_version"] == "1.1.0"
    assert [g.text for g in await backend.generate(["a"], 8)] == ["out:a"]

    rec = make_trtllm(version="1.2.1")  # upgraded: the old engine is stale, rebuilt in place
    await engine_backend(out, checkpoint_dir=checkpoint, build_on_start=True).start()
    assert len(rec.named("_tensorrt_engine.LLM")) == 1
    assert json.loads((out / MANIFEST_NAME).read_text())["tensorrt_llm_version"] == "1.2.1"


async def test_engine_runtime_on_1_3_names_the_pytorch_runtime(
    make_trtllm: Callable[..., Recorder], tmp_path: Path
) -> None:
    make_trtllm(version="1.3.0")
    with pytest.raises(TrtllmSetupError, match="PyTorch runtime"):
        await engine_backend(tmp_path / "engine").start()


async def test_missing_tensorrt_llm_gives_the_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    with pytest.raises(TrtllmSetupError, match=r"guardstream\[trtllm\].*NVIDIA"):
        await engine_backend(tmp_path / "engine").start()


# --- generation -------------------------------------------------------------------------------


@pytest.fixture
async def started(trtllm: Recorder, checkpoint: Path) -> TrtllmBackend:
    backend = TrtllmBackend(
        MODEL, "r1", checkpoint_dir=checkpoint, runtime="pytorch", batch_timeout_s=2.0
    )
    await backend.start()
    return backend


async def test_every_request_is_submitted_before_any_is_awaited(
    trtllm: Recorder, started: TrtllmBackend
) -> None:
    prompts = [f"p{i}" for i in range(6)]
    await started.generate(prompts, 2048)
    kinds = [kind for kind, _ in trtllm.events]
    first_await = kinds.index("await")
    assert kinds[:first_await] == ["submit"] * 6, trtllm.events
    [params] = trtllm.named("SamplingParams")
    assert params.kwargs == {"max_tokens": 2048, "temperature": 0.0, "top_k": 1}


async def test_outputs_map_back_in_order_when_completed_out_of_order(
    trtllm: Recorder, started: TrtllmBackend
) -> None:
    prompts = ["a", "b", "c", "d"]
    trtllm.delays.update({"a": 0.08, "b": 0.0, "c": 0.05, "d": 0.01})
    generations = await started.generate(prompts, 64)
    completed = [p for kind, p in trtllm.events if kind == "complete"]
    assert completed == ["b", "d", "c", "a"], "the fake must really complete out of order"
    assert [g.text for g in generations] == ["out:a", "out:b", "out:c", "out:d"]
    assert all(g.finish_reason == "stop" and g.tokens == 3 for g in generations)


async def test_a_too_long_input_fails_alone(trtllm: Recorder, started: TrtllmBackend) -> None:
    trtllm.submit_errors["long"] = ValueError("prompt length 9000 exceeds max_seq_len 4096")
    trtllm.await_errors["bad"] = RuntimeError("request failed in executor")
    generations = await started.generate(["ok1", "long", "ok2", "bad"], 64)
    assert [g.finish_reason for g in generations] == ["stop", "error", "stop", "error"]
    assert [g.text for g in generations][::2] == ["out:ok1", "out:ok2"]
    assert "exceeds max_seq_len" in (generations[1].error or "")
    assert "request failed in executor" in (generations[3].error or "")


async def test_finish_reason_length_is_kept(trtllm: Recorder, started: TrtllmBackend) -> None:
    trtllm.finish["long"] = "length"
    trtllm.finish["cut"] = "cancelled"
    short, long_, cut = await started.generate(["short", "long", "cut"], 16)
    assert short.finish_reason == "stop"
    assert (long_.finish_reason, long_.tokens) == ("length", 16)
    assert cut.finish_reason == "error" and "cancelled" in (cut.error or "")


async def test_a_batch_timeout_is_a_backend_error_and_aborts(
    trtllm: Recorder, started: TrtllmBackend
) -> None:
    trtllm.hang.add("stuck")
    started.batch_timeout_s = 0.2
    with pytest.raises(BackendError, match="timed out"):
        await started.generate(["fine", "stuck"], 16)
    assert ("abort", "stuck") in trtllm.events
    assert ("abort", "fine") not in trtllm.events, "finished requests are left alone"
    await asyncio.sleep(0)


async def test_a_stop_string_goes_in_that_inputs_sampling_params(
    trtllm: Recorder, started: TrtllmBackend
) -> None:
    await started.generate(["prompt-only", "with-response"], 64, ["\n# Task 2", None])
    params = {tuple(c.kwargs.get("stop") or ()) for c in trtllm.named("SamplingParams")}
    # also without its leading newline: matched on token ids, "\n" merges with the "\n" before it
    assert params == {("\n# Task 2", "# Task 2"), ()}, trtllm.named("SamplingParams")


async def test_a_cancelled_call_aborts_its_unfinished_requests(
    trtllm: Recorder, started: TrtllmBackend
) -> None:
    trtllm.hang.add("stuck")
    call = asyncio.create_task(started.generate(["fine", "stuck"], 16))
    while ("await", "stuck") not in trtllm.events:
        await asyncio.sleep(0)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert ("abort", "stuck") in trtllm.events, "the engine must stop decoding it"


async def test_the_retry_deadline_aborts_a_request_before_it_is_retried(
    trtllm: Recorder, started: TrtllmBackend
) -> None:
    trtllm.hang.add("stuck")
    policy = RetryPolicy(retries=1, backoff_s=0.0, timeout_s=0.2)
    [gen] = await generate_with_retries(started, ["stuck"], 16, policy=policy)
    assert gen.finish_reason == "error" and "timed out" in (gen.error or "")
    stuck = [kind for kind, prompt in trtllm.events if prompt == "stuck"]
    assert stuck == ["submit", "await", "abort", "submit", "await", "abort"], stuck


async def test_generate_before_start_is_a_backend_error(tmp_path: Path) -> None:
    with pytest.raises(BackendError):
        await engine_backend(tmp_path).generate(["x"], 8)
