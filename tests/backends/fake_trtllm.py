"""A stand-in `tensorrt_llm` (and `torch.cuda`) that records every call, for contract tests.

It accepts only the argument names TensorRT-LLM documents (a misspelt or invented name raises
TypeError, as the real pydantic-validated classes do), and imitates the behaviour the backend
relies on: `generate_async` must be called from a running event loop and returns an awaitable
`RequestOutput` whose `outputs[0]` has `text`, `token_ids` and `finish_reason`; the PyTorch
`LLM` rejects engine-only arguments; `_tensorrt_engine` is absent from 1.3 on.
Names checked against the pages listed in test_trtllm_contract.py's docstring.
"""

from __future__ import annotations

import asyncio
import enum
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

LLM_PARAMS = {
    "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code",
    "tensor_parallel_size", "dtype", "revision", "tokenizer_revision",
}  # fmt: skip
LLM_ARGS = {
    "max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "max_beam_width",
    "kv_cache_config", "scheduler_config", "enable_chunked_prefill", "pipeline_parallel_size",
}  # fmt: skip
ENGINE_ONLY_ARGS = {"build_config", "quant_config", "calib_config", "enable_build_cache"}
DOCUMENTED = {
    "BuildConfig": {
        "max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "max_beam_width",
        "opt_num_tokens", "strongly_typed", "plugin_config",
    },
    "QuantConfig": {"quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules"},
    "CalibConfig": {
        "device", "calib_dataset", "calib_batches", "calib_batch_size", "calib_max_seq_length",
        "random_seed", "tokenizer_max_seq_length",
    },
    "KvCacheConfig": {
        "enable_block_reuse", "max_tokens", "free_gpu_memory_fraction", "host_cache_size",
        "enable_partial_reuse", "tokens_per_block", "dtype",
    },
    "SamplingParams": {
        "end_id", "pad_id", "max_tokens", "stop", "stop_token_ids", "n", "top_k", "top_p",
        "temperature", "min_tokens", "logprobs", "ignore_eos", "seed", "detokenize",
    },
}  # fmt: skip


class QuantAlgo(enum.StrEnum):
    FP8 = "FP8"
    NVFP4 = "NVFP4"
    W4A16_AWQ = "W4A16_AWQ"


@dataclass
class Call:
    name: str
    kwargs: dict[str, Any]
    on_main_thread: bool


@dataclass
class Recorder:
    """What the fake saw, and how it should behave."""

    version: str = "1.2.1"
    gpu_name: str | None = "NVIDIA H100 80GB HBM3"
    calls: list[Call] = field(default_factory=list)
    #: ("submit" | "await" | "complete" | "abort", prompt), in the order they happened.
    events: list[tuple[str, str]] = field(default_factory=list)
    submit_errors: dict[str, Exception] = field(default_factory=dict)
    await_errors: dict[str, Exception] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    finish: dict[str, str] = field(default_factory=dict)
    hang: set[str] = field(default_factory=set)

    def named(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.name == name]

    def record(self, name: str, kwargs: dict[str, Any]) -> None:
        main = threading.current_thread() is threading.main_thread()
        self.calls.append(Call(name, dict(kwargs), main))


def _config_class(rec: Recorder, name: str) -> type:
    allowed = DOCUMENTED[name]

    def __init__(self: Any, **kwargs: Any) -> None:
        unknown = set(kwargs) - allowed
        if unknown:
            raise TypeError(f"{name}: unexpected keyword arguments {sorted(unknown)}")
        self.kwargs = kwargs
        for key, value in kwargs.items():
            setattr(self, key, value)
        rec.record(name, kwargs)

    return type(name, (), {"__init__": __init__})


class FakeRequestOutput:
    def __init__(self, rec: Recorder, prompt: str, params: Any) -> None:
        self._rec, self.prompt, self._params = rec, prompt, params
        self.finished = False
        self.outputs: list[Any] = []

    def __await__(self) -> Any:
        return self.aresult().__await__()

    async def aresult(self) -> FakeRequestOutput:
        rec, prompt = self._rec, self.prompt
        rec.events.append(("await", prompt))
        if prompt in rec.hang:
            await asyncio.Event().wait()
        await asyncio.sleep(rec.delays.get(prompt, 0.0))
        if prompt in rec.await_errors:
            raise rec.await_errors[prompt]
        finish = rec.finish.get(prompt, "stop")
        n_tokens = self._params.kwargs["max_tokens"] if finish == "length" else 3
        self.outputs = [
            SimpleNamespace(
                index=0, text=f"out:{prompt}", token_ids=list(range(n_tokens)), finish_reason=finish
            )
        ]
        self.finished = True
        rec.events.append(("complete", prompt))
        return self

    def abort(self) -> None:
        self._rec.events.append(("abort", self.prompt))


def _llm_class(rec: Recorder, name: str, *, engine: bool) -> type:
    class FakeLLM:
        def __init__(self, model: str, **kwargs: Any) -> None:
            allowed = LLM_PARAMS | LLM_ARGS | (ENGINE_ONLY_ARGS if engine else set())
            unknown = set(kwargs) - allowed
            if unknown and not engine and unknown & ENGINE_ONLY_ARGS:
                raise ValueError(
                    f"{sorted(unknown)} only apply to the TensorRT backend: use "
                    "tensorrt_llm._tensorrt_engine.LLM"
                )
            if unknown:
                raise TypeError(f"{name}: unexpected keyword arguments {sorted(unknown)}")
            if not isinstance(model, str):
                raise TypeError("model must be a str path")
            rec.record(name, {"model": model, **kwargs})
            self.model = model

        def generate_async(self, inputs: str, sampling_params: Any = None) -> FakeRequestOutput:
            asyncio.get_running_loop()  # the real one decides awaitability from the loop
            rec.events.append(("submit", inputs))
            if inputs in rec.submit_errors:
                raise rec.submit_errors[inputs]
            return FakeRequestOutput(rec, inputs, sampling_params)

        def save(self, engine_dir: str) -> None:
            rec.record(f"{name}.save", {"engine_dir": engine_dir})
            out = Path(engine_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps({"version": rec.version}))
            (out / "rank0.engine").write_bytes(b"engine")

        def shutdown(self) -> None:
            rec.record(f"{name}.shutdown", {})

    FakeLLM.__name__ = name
    return FakeLLM


def build_modules(rec: Recorder) -> dict[str, ModuleType | None]:
    """sys.modules entries: tensorrt_llm, .llmapi, ._tensorrt_engine (None from 1.3), torch."""
    root = ModuleType("tensorrt_llm")
    llmapi = ModuleType("tensorrt_llm.llmapi")
    root.__version__ = rec.version  # type: ignore[attr-defined]
    pytorch_llm = _llm_class(rec, "LLM", engine=False)
    sampling = _config_class(rec, "SamplingParams")
    for mod in (root, llmapi):
        mod.LLM = pytorch_llm  # type: ignore[attr-defined]
        mod.SamplingParams = sampling  # type: ignore[attr-defined]
    for cls_name in ("BuildConfig", "QuantConfig", "CalibConfig", "KvCacheConfig"):
        setattr(llmapi, cls_name, _config_class(rec, cls_name))
    llmapi.QuantAlgo = QuantAlgo  # type: ignore[attr-defined]
    root.llmapi = llmapi  # type: ignore[attr-defined]
    engine: ModuleType | None = None
    major, minor = (int(x) for x in rec.version.split(".")[:2])
    if (major, minor) < (1, 3):
        engine = ModuleType("tensorrt_llm._tensorrt_engine")
        engine.LLM = _llm_class(rec, "_tensorrt_engine.LLM", engine=True)  # type: ignore[attr-defined]
        root._tensorrt_engine = engine  # type: ignore[attr-defined]
    torch = ModuleType("torch")
    torch.cuda = SimpleNamespace(  # type: ignore[attr-defined]
        is_available=lambda: rec.gpu_name is not None,
        get_device_name=lambda index=0: rec.gpu_name,
    )
    return {
        "tensorrt_llm": root,
        "tensorrt_llm.llmapi": llmapi,
        "tensorrt_llm._tensorrt_engine": engine,
        "torch": torch,
    }
