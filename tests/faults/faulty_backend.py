"""A backend wrapper that injects engine faults, steered by a JSON control file a test rewrites.

The control file (re-read whenever it changes) may hold:

    {
      "delay_s": 0.5,            # sleep this long per generate() call (a slow engine)
      "per_item_s": 0.01,        # plus this long per input of the call
      "raise_on": ["MARK-A"],    # a call with an input containing a marker raises BackendError
      "hang_on": ["MARK-B"],     # ... sleeps for an hour instead (the guard's timeout fires)
      "error_on": ["MARK-C"],    # that one input gets an "error" Generation, the rest run
      "flaky_on": {"MARK-D": 2}  # a call with that input raises its first 2 times, then works
    }

Every call is appended to `<control>.calls.jsonl` (how many inputs, which markers it saw), so a
test can count retries without reading the worker's log.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.backends.base import Backend, BackendError, Generation, Stops


class FaultControl:
    """The control file, re-read when its modification time or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._data: dict[str, Any] = {}

    def read(self) -> dict[str, Any]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                self._data = json.loads(self.path.read_text() or "{}")
                self._stamp = stamp
            except ValueError:
                pass  # caught mid-write: keep the previous state, read again next call
        return self._data


def write_control(path: Path, **values: Any) -> None:
    """Replace the control file atomically (the worker never reads half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values))
    tmp.replace(path)


def read_calls(control: Path) -> list[dict[str, Any]]:
    calls = control.with_suffix(".calls.jsonl")
    if not calls.exists():
        return []
    return [json.loads(line) for line in calls.read_text().splitlines() if line.strip()]


class FaultyBackend(Backend):
    """Delegates to `inner`, adding the faults the control file asks for."""

    def __init__(self, inner: Backend, control: Path) -> None:
        super().__init__(inner.model_id, inner.revision)
        self.name = inner.name
        self.inner = inner
        self.control = FaultControl(control)
        self._calls_path = control.with_suffix(".calls.jsonl")
        self._flaky_seen: dict[str, int] = {}

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def generate(
        self, inputs: Sequence[str], max_new_tokens: int, stop: Stops = None
    ) -> list[Generation]:
        ctl = self.control.read()
        markers = [
            m
            for key in ("raise_on", "hang_on", "error_on")
            for m in ctl.get(key, [])
            if any(m in text for text in inputs)
        ]
        flaky = [m for m in ctl.get("flaky_on", {}) if any(m in text for text in inputs)]
        self._log({"t": time.time(), "n": len(inputs), "markers": markers + flaky})
        delay = float(ctl.get("delay_s", 0.0)) + float(ctl.get("per_item_s", 0.0)) * len(inputs)
        if delay > 0:
            await asyncio.sleep(delay)
        for marker in ctl.get("hang_on", []):
            if any(marker in text for text in inputs):
                await asyncio.sleep(3600)
        for marker in ctl.get("raise_on", []):
            if any(marker in text for text in inputs):
                raise BackendError(f"injected failure on {marker}")
        for marker in flaky:
            seen = self._flaky_seen.get(marker, 0)
            if seen < int(ctl["flaky_on"][marker]):
                self._flaky_seen[marker] = seen + 1
                raise BackendError(f"injected transient failure on {marker} (#{seen + 1})")
        errors = ctl.get("error_on", [])
        out = await self.inner.generate(inputs, max_new_tokens, stop)
        return [
            Generation("", finish_reason="error", error="injected per-input error")
            if any(m in text for m in errors)
            else gen
            for text, gen in zip(inputs, out, strict=True)
        ]

    def _log(self, record: dict[str, Any]) -> None:
        with self._calls_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
