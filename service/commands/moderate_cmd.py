"""`guardstream moderate [FILE|-]`: the guard without Kafka, JSON lines in, JSON lines out.

Each input line is `{"prompt": "...", "response": "..."}` (`response` optional). Each output
line, in input order, is `{"line": N, "flagged": ..., "cached": ..., "verdict": {...}}`, or
`{"line": N, "error": "..."}` for a line that is not such an object (the exit status is then 1).
The engine comes from the GUARDSTREAM_* settings, `--engine`/`--replay` override them; verdicts
are cached in memory for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel, ConfigDict, ValidationError

from engine.cache import MemoryVerdictCache
from engine.guard import Guard, ModerationResult
from schemas.verdict import ModerationRequest
from service.config import Settings, SettingsError
from service.factory import build_backend, build_cascade, guard_options
from service.messages import is_flagged


class _Line(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str
    response: str | None = None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("moderate", help="moderate JSON lines without Kafka")
    p.add_argument("file", nargs="?", default="-", help="JSONL file, or - for stdin")
    p.add_argument("--engine", choices=("replay", "hf", "openai_http", "trtllm"))
    p.add_argument("--replay", type=Path, help="replay folder or file (engine replay)")
    p.add_argument("--window", type=int, default=256, help="requests in flight at most")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.engine:
        overrides["engine"] = args.engine
    if args.replay:
        overrides["replay_path"] = args.replay
    try:
        settings = Settings.from_env(**overrides)
    except SettingsError as err:
        print(f"guardstream moderate: {err}", file=sys.stderr)
        return 2
    if args.file == "-":
        return asyncio.run(_moderate(settings, sys.stdin, sys.stdout, args.window))
    with open(args.file, encoding="utf-8") as fh:
        return asyncio.run(_moderate(settings, fh, sys.stdout, args.window))


async def _moderate(settings: Settings, lines: Iterable[str], out: TextIO, window: int) -> int:
    guard = Guard(
        build_backend(settings),
        cache=MemoryVerdictCache(),
        cascade=build_cascade(settings),
        **guard_options(settings),
    )
    await guard.start()
    errors = 0
    pending: deque[tuple[int, asyncio.Future[ModerationResult] | str]] = deque()

    def emit(number: int, item: asyncio.Future[ModerationResult] | str) -> None:
        if isinstance(item, str):
            out.write(json.dumps({"line": number, "error": item}) + "\n")
            return
        result = item.result()
        row = {
            "line": number,
            "flagged": is_flagged(result.verdict, settings.policy),
            "cached": result.cached,
            "verdict": result.verdict.model_dump(mode="json"),
        }
        out.write(json.dumps(row) + "\n")

    try:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                line = _Line.model_validate_json(text)
            except ValidationError as exc:
                errors += 1
                first = exc.errors(include_url=False)[0]
                where = ".".join(str(p) for p in first["loc"]) or "line"
                pending.append((number, f"{where}: {first['msg']}"))
            else:
                request = ModerationRequest(prompt=line.prompt, response=line.response)
                pending.append((number, await guard.submit(request)))
            while len(pending) > window or (pending and _ready(pending[0][1])):
                head_number, head = pending.popleft()
                if not isinstance(head, str):
                    await head
                emit(head_number, head)
        while pending:
            head_number, head = pending.popleft()
            if not isinstance(head, str):
                await head
            emit(head_number, head)
    finally:
        await guard.close()
    return 1 if errors else 0


def _ready(item: asyncio.Future[ModerationResult] | str) -> bool:
    return isinstance(item, str) or item.done()
