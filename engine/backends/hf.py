"""The `hf` backend: greedy generation with Hugging Face transformers, on CPU or one GPU.

Loads a local checkpoint folder (never a hub download: `local_files_only=True`), pads batches
on the left (decoder-only models continue from the last position of each row), and runs
`model.generate` in a worker thread so the event loop stays free. One generation runs at a time.
torch and transformers are imported in `start()` and the worker, never at module import.

Stop strings (`stop`, one per input) are honoured row by row inside a batch by a stopping
criterion (`_RowStops`): after every decode step it decodes a short tail window of each
watched row's newest tokens (never the whole output) and ends a row whose window holds its stop
string. The row's text is cut before the stop string, its token count is the tokens generated
until the stop string was complete, and its finish reason is "stop"; greedy decoding makes
that text exactly the prefix of the unstopped output. The batching is static (`batching =
"static"`): an ended row produces no more output, but transformers keeps computing every row of
the batch until its last row has ended, so stops save decode steps only where they shorten a
batch's longest row.

A cancelled `generate` (a deadline, a shutdown) sets a flag that the same criterion reads after
every decode step: the generation ends at its next step, and no further batch of the call
starts, so the device is not kept busy for output nobody waits for.

It is the simple, portable backend: correct on any machine, fast on none. On a GPU, `trtllm`
(in-flight batching, paged KV cache) is the production path; `python -m bench.gpu.throughput`
compares the two, and `python -m bench.gpu.early_exit` measures this backend's early exit.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from engine.backends.base import (
    Backend,
    BackendError,
    FinishReason,
    Generation,
    Stops,
    per_input_stops,
)

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "bfloat16", "float16", "float32"]

_SNAPSHOT = re.compile(r"^[0-9a-f]{40}$")
_SAMPLE_BYTES = 1 << 20


def _snapshot_ids(path: Path) -> tuple[str, str] | None:
    """(model id, commit) of a folder in the Hugging Face cache layout
    `.../models--ORG--NAME/snapshots/COMMIT`, else None."""
    if _SNAPSHOT.match(path.name) and path.parent.name == "snapshots":
        repo = path.parent.parent.name
        if repo.startswith("models--"):
            return repo[len("models--") :].replace("--", "/"), path.name
    return None


def checkpoint_revision(path: Path) -> str:
    """A revision for a local checkpoint: the hub commit when the folder is a hub-cache snapshot,
    else `sha256:` and 12 hex digits of a digest of config.json, generation_config.json and, for
    each weight file, its name, size and first and last MiB. The weight sample tells apart two
    fine-tunes of one base model, whose config.json files are identical; reading it costs a
    few MiB, not the whole checkpoint."""
    snap = _snapshot_ids(path)
    if snap is not None:
        return snap[1]
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"model_path {str(path)!r} has no config.json: not a checkpoint")
    digest = hashlib.sha256(config.read_bytes())
    gen = path / "generation_config.json"
    if gen.is_file():
        digest.update(gen.read_bytes())
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    for weight in weights:
        size = weight.stat().st_size
        digest.update(f"{weight.name}:{size}".encode())
        with weight.open("rb") as fh:
            digest.update(fh.read(_SAMPLE_BYTES))
            fh.seek(max(0, size - _SAMPLE_BYTES))
            digest.update(fh.read(_SAMPLE_BYTES))
    return "sha256:" + digest.hexdigest()[:12]


class HfBackend(Backend):
    """Greedy generation with transformers from a local checkpoint folder.

    `device="auto"` takes CUDA when torch sees a GPU; `dtype="auto"` is bfloat16 on CUDA and
    float32 on CPU. Inputs are split into batches of at most `max_batch_size` (grouped by
    length, to waste less padding; results come back in input order). `ignore_eos=True` pins
    every output at `max_new_tokens` (for benchmarks) unless a stop string ends it first. An
    input that does not fit the model's positions together with `max_new_tokens` fails alone
    (`finish_reason="error"`). Stop strings and cancellation: see the module docstring.
    """

    name = "hf"

    def __init__(
        self,
        model_path: str | Path,
        model_id: str | None = None,
        revision: str | None = None,
        *,
        device: Device = "auto",
        dtype: DType = "auto",
        max_batch_size: int = 16,
        ignore_eos: bool = False,
    ) -> None:
        path = Path(model_path).expanduser()
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
        if dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {dtype!r}")
        snap = _snapshot_ids(path)
        super().__init__(
            model_id or (snap[0] if snap else path.name),
            revision or checkpoint_revision(path),
        )
        self.model_path = path
        self.requested_device: Device = device
        self.requested_dtype: DType = dtype
        self.max_batch_size = max_batch_size
        self.ignore_eos = ignore_eos
        self._lock = asyncio.Lock()  # queues callers on the event loop
        self._model_lock = threading.Lock()  # the model itself, even if a caller was cancelled
        self._model: Any = None
        self._tokenizer: Any = None
        self._device = ""
        self._eos_ids: list[int] = []
        self._pad_id = 0
        self._max_positions: int | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    @property
    def device(self) -> str:
        """The device the model is on ("cpu", "cuda"), once started."""
        return self._device

    @property
    def dtype(self) -> str:
        """The model's torch dtype ("bfloat16", ...), once started."""
        return str(self._model.dtype).removeprefix("torch.") if self._model is not None else ""

    @property
    def weight_bytes(self) -> int:
        """Bytes of the model's parameters (what one decode step reads), once started."""
        if self._model is None:
            return 0
        return int(sum(p.numel() * p.element_size() for p in self._model.parameters()))

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos_ids)

    async def start(self) -> None:
        if self._model is None:
            await asyncio.to_thread(self._load)

    async def close(self) -> None:
        async with self._lock:
            await asyncio.to_thread(self._unload)

    def _load(self) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        with self._model_lock:
            if self._model is not None:
                return
            cuda = torch.cuda.is_available()
            if self.requested_device == "cuda" and not cuda:
                raise BackendError("device='cuda' was asked for, but torch sees no CUDA device")
            device = "cuda" if self.requested_device == "auto" and cuda else self.requested_device
            device = "cpu" if device == "auto" else device
            name = self.requested_dtype
            if name == "auto":
                name = "bfloat16" if device == "cuda" else "float32"
            tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None and tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
            # transformers 4.56 renamed torch_dtype to dtype.
            major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
            dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
            model = AutoModelForCausalLM.from_pretrained(
                self.model_path, local_files_only=True, **{dtype_key: getattr(torch, name)}
            )
            model = model.to(device).eval()
            eos = model.generation_config.eos_token_id
            if eos is None:
                eos = tokenizer.eos_token_id
            eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
            pad = tokenizer.pad_token_id
            pad_id = int(pad) if pad is not None else (eos_ids[0] if eos_ids else 0)
            # Pure greedy: drop the checkpoint's sampling defaults (temperature, top_p, ...)
            # and anything else that would change what greedy decoding picks.
            model.generation_config = GenerationConfig(
                bos_token_id=model.generation_config.bos_token_id,
                eos_token_id=eos_ids or None,
                pad_token_id=pad_id,
                do_sample=False,
                num_beams=1,
            )
            positions = getattr(model.config, "max_position_embeddings", None)
            self._tokenizer, self._model, self._device = tokenizer, model, device
            self._eos_ids, self._pad_id = eos_ids, pad_id
            self._max_positions = int(positions) if positions else None

    def _unload(self) -> None:
        with self._model_lock:
            on_cuda = self._device == "cuda"
            self._model = self._tokenizer = None
            if on_cuda:
                import torch

                torch.cuda.empty_cache()

    # ---- generation --------------------------------------------------------------------------

    async def generate(
        self, inputs: Sequence[str], max_new_tokens: int, stop: Stops = None
    ) -> list[Generation]:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stops = per_input_stops(stop, len(inputs))
        if not inputs:
            return []
        cancel = threading.Event()
        async with self._lock:
            if self._model is None:
                raise BackendError("hf backend is not started (call start() first)")
            try:
                return await asyncio.to_thread(
                    self._generate_all, list(inputs), max_new_tokens, stops, cancel
                )
            except asyncio.CancelledError:
                # The worker thread cannot be interrupted, but it reads this flag after every
                # decode step (`_RowStops`) and before every batch: it ends at its next step.
                cancel.set()
                raise

    def _generate_all(
        self,
        inputs: list[str],
        max_new_tokens: int,
        stops: list[str | None],
        cancel: threading.Event,
    ) -> list[Generation]:
        with self._model_lock:
            if self._model is None:
                raise BackendError("hf backend was closed")
            encoded: list[list[int]] = self._tokenizer(inputs)["input_ids"]
            out: list[Generation | None] = [None] * len(inputs)
            todo: list[tuple[int, list[int]]] = []
            for i, ids in enumerate(encoded):
                problem = self._check_length(len(ids), max_new_tokens)
                if problem is None:
                    todo.append((i, ids))
                else:  # another attempt gives the same tokens: not retryable
                    out[i] = Generation(
                        text="", tokens=None, finish_reason="error", error=problem, retryable=False
                    )
            todo.sort(key=lambda item: len(item[1]), reverse=True)
            for start in range(0, len(todo), self.max_batch_size):
                if cancel.is_set():
                    raise _Cancelled
                chunk = todo[start : start + self.max_batch_size]
                gens = self._run_chunk(chunk, max_new_tokens, stops, cancel)
                for (i, _), gen in zip(chunk, gens, strict=True):
                    out[i] = gen
            return [g for g in out if g is not None]

    def _check_length(self, n: int, max_new_tokens: int) -> str | None:
        if n == 0:
            return "input is empty: it encodes to no tokens"
        limit = self._max_positions
        if limit is not None and n + max_new_tokens > limit:
            return (
                f"input has {n} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                f"model's {limit} positions"
            )
        return None

    def _row_limits(self, indices: Sequence[int]) -> list[int] | None:
        """Per-row caps on new tokens for the call's inputs at `indices` (one padded batch), or
        None: every row may run to max_new_tokens. None here; the GPU bench
        (`bench.gpu.early_exit`) overrides it to pin each row's output length to a recorded
        one. A row that reaches its cap ends with finish reason "length"."""
        return None

    def _run_chunk(
        self,
        chunk: list[tuple[int, list[int]]],
        max_new_tokens: int,
        stops: list[str | None],
        cancel: threading.Event,
    ) -> list[Generation]:
        import torch

        try:
            return self._generate_padded(chunk, max_new_tokens, stops, cancel)
        except torch.OutOfMemoryError as exc:
            if len(chunk) == 1:
                raise BackendError(f"out of device memory on a single input: {exc}") from exc
            if self._device == "cuda":
                torch.cuda.empty_cache()
            half = len(chunk) // 2
            return self._run_chunk(chunk[:half], max_new_tokens, stops, cancel) + (
                self._run_chunk(chunk[half:], max_new_tokens, stops, cancel)
            )
        except (BackendError, _Cancelled):
            raise
        except Exception as exc:
            raise BackendError(f"generation failed for a batch of {len(chunk)}: {exc!r}") from exc

    def _generate_padded(
        self,
        chunk: list[tuple[int, list[int]]],
        max_new_tokens: int,
        stops: list[str | None],
        cancel: threading.Event,
    ) -> list[Generation]:
        import torch
        from transformers import StoppingCriteriaList

        rows = [ids for _, ids in chunk]
        row_stops = [stops[i] for i, _ in chunk]
        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, ids in enumerate(rows):
            input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[r, width - len(ids) :] = 1
        criterion = _RowStops(
            self._tokenizer,
            width,
            row_stops,
            self._row_limits([i for i, _ in chunk]),
            self._eos_ids,
            cancel,
        )
        extra: dict[str, Any] = {}
        if self.ignore_eos:
            extra["min_new_tokens"] = max_new_tokens
        with torch.inference_mode():
            output = self._model.generate(
                input_ids=input_ids.to(self._device),
                attention_mask=mask.to(self._device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=self._pad_id,
                stopping_criteria=StoppingCriteriaList([criterion]),
                **extra,
            )
        if cancel.is_set():
            raise _Cancelled
        new_tokens: list[list[int]] = output[:, width:].tolist()
        return [
            self._finish(tokens, stop, criterion.ended.get(r))
            for r, (tokens, stop) in enumerate(zip(new_tokens, row_stops, strict=True))
        ]

    def _finish(
        self, tokens: list[int], stop: str | None, ended: tuple[int, FinishReason] | None
    ) -> Generation:
        """One row of new tokens as a Generation: cut where `_RowStops` ended the row (`ended`:
        its new-token count then, and why), or at its first EOS (kept in the count; the padding
        that follows it in a batch is not), and its text cut before its stop string."""
        reason: FinishReason = "length"
        if ended is not None:
            tokens, reason = tokens[: ended[0]], ended[1]
        if not self.ignore_eos:
            for k, token in enumerate(tokens):
                if token in self._eos_ids:
                    tokens, reason = tokens[: k + 1], "stop"
                    break
        text = str(self._tokenizer.decode(tokens, skip_special_tokens=True))
        if stop is not None:
            cut = text.find(stop)
            if cut >= 0:
                text, reason = text[:cut], "stop"
        return Generation(text=text, tokens=len(tokens), finish_reason=reason)


class _Cancelled(Exception):
    """The call was cancelled: its worker stopped generating, and nobody reads its output."""


#: A stop string's tail window holds this many tokens more than the stop string has bytes. A
#: token stands for at least one byte, so the window holds the whole stop string and at least
#: one token before it (decoding a window can garble only its first token: a leading space
#: dropped, a character whose first bytes lie before the window).
_WINDOW_MARGIN = 2


class _RowStops:
    """The stopping criterion of one padded batch (transformers calls it after every decode
    step with the batch's token ids so far and gets one bool per row: True ends the row).

    Row r ends once the text of its newest tokens contains `stops[r]`, or once it has
    `limits[r]` new tokens; every row ends at once when `cancel` is set. For each row it ended
    it keeps `ended[r]`: the row's new-token count at that step, and the finish reason ("stop"
    for a stop string, "length" for a cap). Only a tail window of each watched row is decoded,
    one batched decode per step: never the whole output. A row stops being watched once it has
    ended or its newest token is an EOS (what follows is padding).

    transformers feeds an ended row padding from then on, but a static batch keeps computing
    every row until its last one has ended: an early stop saves the batch's decode steps only
    when it shortens the batch's longest row."""

    def __init__(
        self,
        tokenizer: Any,
        width: int,
        stops: list[str | None],
        limits: list[int] | None,
        eos_ids: Sequence[int],
        cancel: threading.Event,
    ) -> None:
        self._tokenizer = tokenizer
        self._width = width
        self._stops = stops
        self._windows = [len(s.encode()) + _WINDOW_MARGIN if s else 0 for s in stops]
        self._watched = [r for r, s in enumerate(stops) if s]
        self._limits = limits
        self._eos = frozenset(eos_ids)
        self._cancel = cancel
        self._no_row: Any = None  # the all-False answer, made once on the batch's device
        self.ended: dict[int, tuple[int, FinishReason]] = {}

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        batch = int(input_ids.shape[0])
        if self._cancel.is_set():
            return torch.ones(batch, dtype=torch.bool, device=input_ids.device)
        n = int(input_ids.shape[1]) - self._width
        newly: list[int] = []
        if self._limits is not None:
            for r, limit in enumerate(self._limits):
                if n >= limit and r not in self.ended:
                    self.ended[r] = (n, "length")
                    newly.append(r)
        if self._watched:
            newly += self._find_stops(input_ids, n)
        if not newly:
            if self._no_row is None:
                self._no_row = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
            return self._no_row
        done = torch.zeros(batch, dtype=torch.bool)
        done[newly] = True
        return done.to(input_ids.device)

    def _find_stops(self, input_ids: Any, n: int) -> list[int]:
        """The watched rows whose tail window now holds their stop string (ended here)."""
        span = min(n, max(self._windows[r] for r in self._watched))
        tails: list[list[int]] = input_ids[:, -span:].tolist()
        rows: list[int] = []
        windows: list[list[int]] = []
        for r in self._watched:
            tail = tails[r][-self._windows[r] :]
            if r in self.ended or tail[-1] in self._eos:
                continue
            rows.append(r)
            windows.append(tail)
        if not windows:
            self._watched = []
            return []
        texts: list[str] = self._tokenizer.batch_decode(windows, skip_special_tokens=True)
        found: list[int] = []
        still: list[int] = []
        for r, text in zip(rows, texts, strict=True):
            stop = self._stops[r]
            if stop is not None and stop in text:
                self.ended[r] = (n, "stop")
                found.append(r)
            else:
                still.append(r)
        self._watched = still
        return found
