"""A small OpenAI-compatible completions server for the `openai_http` tests (aiohttp).

It answers `POST /v1/completions` from replay data the test provides (prompt -> text), and
`GET /v1/models`. The test can script faults per prompt (429 with Retry-After, 500, a hang past
the client's timeout), and reads back what the server saw: every request with its arrival time,
headers and TCP peer, the highest number of requests it was serving at once, and the requests
whose client went away while they were still generating (`aborted`: vLLM and trtllm-serve abort
such a generation). A `"stop"` list in the body cuts the reply before the first stop string, as
those servers do.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour, used up by one request."""

    status: int | None = None
    retry_after: str | None = None
    hang: bool = False


@dataclass(frozen=True)
class Seen:
    prompt: str
    body: dict[str, Any]
    authorization: str | None
    peer: tuple[str, int]
    at: float


@dataclass
class CompletionsServer:
    replies: dict[str, str]
    model: str = "guard"
    #: Seconds each answer takes (per prompt; default `delay_s`).
    delay_s: float = 0.0
    delays: dict[str, float] = field(default_factory=dict)
    #: Faults used up in order, one per request for that prompt.
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    #: Status answered to every request for that prompt.
    always: dict[str, int] = field(default_factory=dict)
    #: Prompts answered as cut at max_tokens.
    truncated: set[str] = field(default_factory=set)
    seen: list[Seen] = field(default_factory=list)
    #: Prompts of requests whose connection closed while they were being answered.
    aborted: list[str] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    base_url: str = ""

    def __post_init__(self) -> None:
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None

    def requests_for(self, prompt: str) -> list[Seen]:
        return [s for s in self.seen if s.prompt == prompt]

    @property
    def connections(self) -> set[tuple[str, int]]:
        return {s.peer for s in self.seen}

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(self._runner, sock)
        await site.start()
        self.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self.base_url

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model}]})

    async def _completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("model") != self.model:  # as vLLM answers a model it does not serve
            return web.json_response(
                {"error": {"message": f"The model `{body.get('model')}` does not exist."}},
                status=404,
            )
        prompt = body["prompt"]
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.seen.append(
            Seen(
                prompt,
                body,
                request.headers.get("Authorization"),
                tuple(peer or ("", 0)),
                time.monotonic(),
            )
        )
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(prompt, body, request)
        finally:
            self.in_flight -= 1

    async def _generating(self, prompt: str, request: web.Request, seconds: float) -> bool:
        """Wait `seconds` (or until released) as a generation would; False when the client
        closed the connection meanwhile (recorded in `aborted`)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._release.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                self.aborted.append(prompt)
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), timeout=0.01)
        return True

    async def _answer(
        self, prompt: str, body: dict[str, Any], request: web.Request
    ) -> web.Response:
        queue = self.faults.get(prompt)
        fault = queue.pop(0) if queue else None
        if fault is not None and fault.hang:
            await self._generating(prompt, request, 30.0)
            return web.json_response({"error": "released"}, status=503)
        status = fault.status if fault is not None else self.always.get(prompt)
        if status is not None:
            headers = {"Retry-After": fault.retry_after} if fault and fault.retry_after else {}
            return web.json_response({"error": {"code": status}}, status=status, headers=headers)
        delay = self.delays.get(prompt, self.delay_s)
        if delay and not await self._generating(prompt, request, delay):
            return web.json_response({"error": "client gone"}, status=499)
        if prompt not in self.replies:
            return web.json_response({"error": f"no replay for {prompt!r}"}, status=404)
        max_tokens = int(body["max_tokens"])
        cut = prompt in self.truncated
        text = self.replies[prompt]
        for stop in body.get("stop") or []:
            text = text.split(stop, 1)[0]
        return web.json_response(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "text": text,
                        "finish_reason": "length" if cut else "stop",
                    }
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": max_tokens if cut else 7},
            }
        )
