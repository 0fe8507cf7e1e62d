"""The `trtllm` backend: GuardReasoner in-process on the GPU with TensorRT-LLM's LLM API.

Two runtimes, chosen by `runtime` (GUARDSTREAM_TRTLLM_RUNTIME):

- `"engine"`: a compiled TensorRT engine, loaded with `tensorrt_llm._tensorrt_engine.LLM`
  (tensorrt_llm 1.0-1.2.x only; 1.3 removed that path). The engine folder must carry the
  `guardstream-engine.json` manifest written by `guardstream engine build`; an engine built for
  another tensorrt_llm version, another GPU model or another checkpoint is refused with the exact
  command that rebuilds it, or rebuilt on the spot when `build_on_start` is set.
- `"pytorch"`: `tensorrt_llm.LLM` (the PyTorch backend, any 1.x) loads the Hugging Face
  checkpoint directly; no engine, no manifest.

Batching: every input of a batch is submitted with `llm.generate_async` before any result is
awaited, so TensorRT-LLM's in-flight batching schedules them together (and alongside other
batches still running). Decoding is greedy (`temperature=0, top_k=1`, which is greedy on every
1.x sampler) with `max_tokens` always set: its default, 32, would silently truncate the guard's
reasoning. A too-long input raises `ValueError` from `generate_async`; that input alone becomes a
`Generation(finish_reason="error")`. A batch that does not finish within `batch_timeout_s`
raises `BackendError` and its unfinished requests are aborted; so are a cancelled call's (the
retry policy's deadline, a shutdown). A prompt-only input's stop string goes in its
`SamplingParams(stop=...)`.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from engine.backends.base import Backend, BackendError, Generation, Stops, per_input_stops
from engine.trtllm_build import build_engine
from engine.trtllm_manifest import (
    MANIFEST_NAME,
    BuildSettings,
    EngineManifest,
    TrtllmSetupError,
    detect_gpu_name,
    engine_path_removed_message,
    engine_path_supported,
    engine_revision,
    import_tensorrt_llm,
    installed_version,
    manifest_mismatches,
    rebuild_command,
)

log = logging.getLogger(__name__)

Runtime = Literal["engine", "pytorch"]


def _error(message: str, *, retryable: bool = True) -> Generation:
    return Generation(
        text="", tokens=None, finish_reason="error", error=message, retryable=retryable
    )


def _to_generation(result: Any) -> Generation:
    """A finished `RequestOutput` -> Generation (outputs[0]: text, token_ids, finish_reason)."""
    completion = result.outputs[0]
    token_ids = getattr(completion, "token_ids", None)
    tokens = len(token_ids) if token_ids is not None else None
    text = str(completion.text)
    reason = getattr(completion, "finish_reason", None)
    if reason == "length":
        return Generation(text=text, tokens=tokens, finish_reason="length")
    if reason in ("stop", None):
        return Generation(text=text, tokens=tokens, finish_reason="stop")
    # 'timeout' / 'cancelled': the text is incomplete and must not be parsed as a verdict.
    return Generation(
        text=text, tokens=tokens, finish_reason="error", error=f"tensorrt_llm finished: {reason}"
    )


async def _collect(pending: Any) -> Generation:
    try:
        result = await pending
    except ValueError as exc:
        return _error(f"input rejected by tensorrt_llm: {exc}", retryable=False)
    except Exception as exc:  # noqa: BLE001 - one request's failure must not fail the batch
        return _error(f"tensorrt_llm request failed: {type(exc).__name__}: {exc}")
    return _to_generation(result)


def _abort_unfinished(pending: Sequence[Any]) -> int:
    unfinished = 0
    for out in pending:
        if getattr(out, "finished", False):
            continue
        unfinished += 1
        abort = getattr(out, "abort", None)
        if callable(abort):
            try:
                abort()
            except Exception as exc:  # noqa: BLE001 - best effort while failing the batch
                log.warning("could not abort a timed-out tensorrt_llm request: %s", exc)
    return unfinished


class TrtllmBackend(Backend):
    name = "trtllm"
    batching = "inflight"

    def __init__(
        self,
        model_id: str,
        revision: str | None,
        *,
        engine_dir: Path | None = None,
        checkpoint_dir: Path | None = None,
        runtime: Runtime = "engine",
        build_on_start: bool = False,
        kv_cache_free_gpu_memory_fraction: float = 0.85,
        max_batch_size: int = 64,
        max_num_tokens: int = 8192,
        max_seq_len: int = 4096,
        tensor_parallel_size: int = 1,
        batch_timeout_s: float = 600.0,
    ) -> None:
        # No revision given: derived at start from what is loaded (`_derive_revision`).
        super().__init__(model_id, revision or "pending")
        self._revision_given = revision is not None
        if runtime == "engine":
            if engine_dir is None:
                raise ValueError("engine_dir: required for runtime 'engine'")
            if build_on_start and checkpoint_dir is None:
                raise ValueError("checkpoint_dir: required when build_on_start is set")
        elif runtime == "pytorch":
            if checkpoint_dir is None:
                raise ValueError("checkpoint_dir: required for runtime 'pytorch'")
        else:
            raise ValueError(f"runtime: expected 'engine' or 'pytorch', got {runtime!r}")
        if not 0 < kv_cache_free_gpu_memory_fraction <= 1:
            raise ValueError("kv_cache_free_gpu_memory_fraction: expected a value in (0, 1]")
        if batch_timeout_s <= 0:
            raise ValueError("batch_timeout_s: expected a positive number of seconds")
        self.engine_dir = engine_dir
        self.checkpoint_dir = checkpoint_dir
        self.runtime: Runtime = runtime
        self.build_on_start = build_on_start
        self.kv_cache_free_gpu_memory_fraction = kv_cache_free_gpu_memory_fraction
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.max_seq_len = max_seq_len
        self.tensor_parallel_size = tensor_parallel_size
        self.batch_timeout_s = batch_timeout_s
        self._trtllm: ModuleType | None = None
        self._llm: Any = None
        self._sampling: dict[tuple[int, str | None], Any] = {}

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._llm is not None:
            return
        # Importing, checking the GPU, building and loading all block for long: off the loop.
        self._trtllm, self._llm = await asyncio.to_thread(self._load)
        if not self._revision_given:
            self.revision = await asyncio.to_thread(self._derive_revision)
            log.info("model revision %s (derived from the %s)", self.revision, self.runtime)

    def _derive_revision(self) -> str:
        """The engine's revision (its manifest and files), or the checkpoint's digest for the
        PyTorch runtime: what keys the verdict cache when no revision is configured."""
        if self.runtime == "engine":
            assert self.engine_dir is not None
            return engine_revision(self.engine_dir)
        from engine.backends.hf import checkpoint_revision  # no torch import: a digest only

        assert self.checkpoint_dir is not None
        return checkpoint_revision(self.checkpoint_dir)

    async def close(self) -> None:
        llm, self._llm = self._llm, None
        self._sampling.clear()
        shutdown = getattr(llm, "shutdown", None)
        if callable(shutdown):
            await asyncio.to_thread(shutdown)

    def _load(self) -> tuple[ModuleType, Any]:
        trtllm = import_tensorrt_llm()
        llmapi = importlib.import_module("tensorrt_llm.llmapi")
        kv_cache_config = llmapi.KvCacheConfig(
            enable_block_reuse=True,
            free_gpu_memory_fraction=self.kv_cache_free_gpu_memory_fraction,
        )
        runtime_kwargs: dict[str, Any] = {
            "kv_cache_config": kv_cache_config,
            "max_batch_size": self.max_batch_size,
            "max_num_tokens": self.max_num_tokens,
            "tensor_parallel_size": self.tensor_parallel_size,
        }
        if self.runtime == "pytorch":
            assert self.checkpoint_dir is not None
            # max_input_len defaults to 1024 on the LLM API: too small for chat transcripts.
            llm = trtllm.LLM(
                model=str(self.checkpoint_dir),
                max_seq_len=self.max_seq_len,
                max_input_len=self.max_seq_len,
                **runtime_kwargs,
            )
            return trtllm, llm
        return trtllm, self._load_engine(trtllm, runtime_kwargs)

    def _default_settings(self) -> BuildSettings:
        return BuildSettings(
            max_batch_size=self.max_batch_size,
            max_num_tokens=self.max_num_tokens,
            max_seq_len=self.max_seq_len,
            tensor_parallel_size=self.tensor_parallel_size,
        )

    def _load_engine(self, trtllm: ModuleType, runtime_kwargs: dict[str, Any]) -> Any:
        engine_dir = self.engine_dir
        assert engine_dir is not None
        version = installed_version(trtllm)
        if not engine_path_supported(version):
            raise TrtllmSetupError(engine_path_removed_message(version))
        manifest = EngineManifest.read(engine_dir) if engine_dir.is_dir() else None
        settings = manifest.build if manifest is not None else self._default_settings()
        checkpoint: Path | str = self.checkpoint_dir or (
            manifest.checkpoint if manifest is not None else "CHECKPOINT_DIR"
        )
        if manifest is not None:
            problems = manifest_mismatches(
                manifest,
                version=version,
                gpu_name=detect_gpu_name(),
                checkpoint=self.checkpoint_dir,
            )
            if not problems:
                self._warn_beyond_build(manifest.build)
                engine_mod = importlib.import_module("tensorrt_llm._tensorrt_engine")
                return engine_mod.LLM(model=str(engine_dir), **runtime_kwargs)
            reason = "; ".join(problems)
        elif engine_dir.is_dir() and any(engine_dir.iterdir()):
            reason = f"it has no {MANIFEST_NAME} (it was not built by `guardstream engine build`)"
        else:
            reason = "there is no engine there yet"
        if self.build_on_start and self.checkpoint_dir is not None:
            log.warning("engine at %s unusable (%s): building it now", engine_dir, reason)
            built = build_engine(
                self.checkpoint_dir,
                engine_dir,
                settings,
                overwrite=True,
                runtime_kwargs=runtime_kwargs,
            )
            return built.llm
        raise TrtllmSetupError(
            f"cannot use the TensorRT engine at {engine_dir}: {reason}. A TensorRT engine only "
            "runs on the tensorrt_llm version and GPU model it was compiled with, for the "
            "checkpoint it was compiled from; rebuild it on this machine with\n"
            f"  {rebuild_command(checkpoint, engine_dir, settings)}\n"
            "or start with build_on_start (GUARDSTREAM_TRTLLM_BUILD_ON_START=true), or use the "
            "PyTorch runtime (GUARDSTREAM_TRTLLM_RUNTIME=pytorch) on the checkpoint."
        )

    def _warn_beyond_build(self, build: BuildSettings) -> None:
        for name in ("max_batch_size", "max_num_tokens", "max_seq_len"):
            wanted, built = getattr(self, name), getattr(build, name)
            if wanted > built:
                log.warning(
                    "%s=%d exceeds the engine's build limit %d; using %d",
                    name,
                    wanted,
                    built,
                    built,
                )

    # --- generation ----------------------------------------------------------------------------

    def _sampling_params(self, max_new_tokens: int, stop: str | None) -> Any:
        params = self._sampling.get((max_new_tokens, stop))
        if params is None:
            assert self._trtllm is not None
            options: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": 0.0, "top_k": 1}
            if stop is not None:
                # TensorRT-LLM matches stop strings on token ids: the string as the tokenizer
                # encodes it on its own. A leading newline merges with the newlines before it in
                # context (Llama 3 has one token for "\n\n"), so the string without it is
                # passed too. The output leaves the stop out (include_stop_str_in_output is
                # False by default).
                options["stop"] = list(dict.fromkeys([stop, stop.lstrip("\n") or stop]))
            params = self._trtllm.SamplingParams(**options)
            self._sampling[(max_new_tokens, stop)] = params
        return params

    async def generate(
        self, inputs: Sequence[str], max_new_tokens: int, stop: Stops = None
    ) -> list[Generation]:
        if self._llm is None:
            raise BackendError("TrtllmBackend.generate() called before start()")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens: expected >= 1")
        stops = per_input_stops(stop, len(inputs))
        results: list[Generation | None] = [None] * len(inputs)
        submitted: list[tuple[int, Any]] = []
        # Submit everything first: in-flight batching only sees requests that were submitted.
        for index, (prompt, stop_at) in enumerate(zip(inputs, stops, strict=True)):
            params = self._sampling_params(max_new_tokens, stop_at)
            try:
                submitted.append((index, self._llm.generate_async(prompt, params)))
            except ValueError as exc:
                results[index] = _error(f"input rejected by tensorrt_llm: {exc}", retryable=False)
            except Exception as exc:  # noqa: BLE001 - one input's failure must not fail the batch
                results[index] = _error(f"tensorrt_llm submit failed: {type(exc).__name__}: {exc}")
        if submitted:
            pending = [out for _, out in submitted]
            try:
                async with asyncio.timeout(self.batch_timeout_s):
                    done = await asyncio.gather(*(_collect(out) for out in pending))
            except TimeoutError as exc:
                unfinished = _abort_unfinished(pending)
                raise BackendError(
                    f"tensorrt_llm batch of {len(inputs)} timed out after {self.batch_timeout_s}s "
                    f"({unfinished} requests unfinished, aborted)"
                ) from exc
            except asyncio.CancelledError:
                # The caller gave up (the retry policy's deadline, a shutdown): without an
                # abort the engine would go on decoding these for nobody, beside their retry.
                aborted = _abort_unfinished(pending)
                if aborted:
                    log.info("cancelled: aborted %d tensorrt_llm requests", aborted)
                raise
            for (index, _), generation in zip(submitted, done, strict=True):
                results[index] = generation
        return [g if g is not None else _error("no result") for g in results]
