"""`replay`: recorded real GuardReasoner outputs, looked up by the exact model input.

Reads GuardReasoner prediction files (JSON lines with `prompt`, the full model input, and
`predict`, the generated text): one ``.jsonl`` file, or every ``*.jsonl`` in a folder. For tests
and benchmarks without a GPU: the outputs are what the real model generated, greedily.

Duplicates: files are read in sorted filename order and the first recorded output of an input
wins. In the reference data the only inputs recorded twice with different outputs are the 445
shared by the two XSTest files, so a folder replay answers them from ``XSTestReponseHarmful``
(which sorts first); `conflicts` counts such inputs. To reproduce one benchmark's own figures,
replay that benchmark's file alone.

Stop strings (`Backend.generate`'s `stop`, one per input or None): the recorded output is cut
before the first occurrence of the input's stop string, which is left out, and the finish reason
is ``"stop"``; greedy decoding makes that exactly what the model would have generated with the
stop string. An output without an occurrence is replayed whole. A `stop` with another number of
entries than inputs, or an empty stop string, is a ValueError (as for every backend).

Tokens are approximated as one per four characters, rounded up (no tokenizer here), of the text
returned. When `max_new_tokens` is below that count the text (cut at its stop string first) is
cut at ``4 * max_new_tokens`` characters and the finish reason is ``"length"``. An input with no
recorded output gets an ``"error"`` generation naming the input's sha256, and the rest of the
batch is answered.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from engine.backends.base import Backend, Generation, Stops, per_input_stops

#: Characters per approximate token.
CHARS_PER_TOKEN = 4


def approx_tokens(text: str) -> int:
    """The approximate token count of `text`: one per four characters, rounded up."""
    return -(-len(text) // CHARS_PER_TOKEN)


class ReplayBackend(Backend):
    """Answers each model input with the output recorded for it."""

    name = "replay"

    def __init__(
        self,
        path: Path | str,
        model_id: str = "GuardReasoner-replay",
        revision: str | None = None,
    ) -> None:
        self.files = _prediction_files(Path(path))
        self.outputs: dict[str, str] = {}
        self.conflicts = 0
        digest = hashlib.sha256()
        for file in self.files:
            data = file.read_bytes()
            digest.update(hashlib.sha256(data).digest())
            self._index(file, data)
        super().__init__(model_id, revision or digest.hexdigest()[:12])

    def _index(self, file: Path, data: bytes) -> None:
        for number, line in enumerate(data.decode("utf-8").split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                model_input, output = record["prompt"], record["predict"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{file}:{number}: not a prediction record with 'prompt' and 'predict' ({exc})"
                ) from exc
            known = self.outputs.setdefault(model_input, output)
            if known != output:
                self.conflicts += 1

    async def generate(
        self, inputs: Sequence[str], max_new_tokens: int, stop: Stops = None
    ) -> list[Generation]:
        stops = per_input_stops(stop, len(inputs))
        generations = [
            self._replay(text, max_new_tokens, until)
            for text, until in zip(inputs, stops, strict=True)
        ]
        await asyncio.sleep(0)  # a real backend yields here; let the loop breathe
        return generations

    def _replay(self, model_input: str, max_new_tokens: int, stop: str | None) -> Generation:
        output = self.outputs.get(model_input)
        if output is None:
            digest = hashlib.sha256(model_input.encode("utf-8")).hexdigest()
            return Generation(
                text="",
                finish_reason="error",
                error=f"no recorded output for this input (sha256 {digest})",
            )
        if stop is not None and (at := output.find(stop)) >= 0:
            output = output[:at]
        tokens = approx_tokens(output)
        if tokens > max_new_tokens:
            cut = output[: max(0, max_new_tokens) * CHARS_PER_TOKEN]
            return Generation(text=cut, tokens=approx_tokens(cut), finish_reason="length")
        return Generation(text=output, tokens=tokens, finish_reason="stop")


def _prediction_files(path: Path) -> tuple[Path, ...]:
    if path.is_dir():
        files = tuple(sorted(path.glob("*.jsonl"), key=lambda p: p.name))
        if not files:
            raise ValueError(f"no *.jsonl prediction files in {path}")
        return files
    if path.is_file():
        return (path,)
    raise FileNotFoundError(f"replay predictions not found: {path}")
