"""The `openai_http` backend: any OpenAI-compatible completions server (trtllm-serve, vLLM).

One `POST {base_url}/v1/completions` per input, `{"model", "prompt", "max_tokens",
"temperature": 0, "top_p": 1}` (greedy; `"stop": [...]` when the input has one), all of a
batch in flight at once but never more than `max_concurrency` (an asyncio.Semaphore; the
server's own scheduler does the batching). One `httpx.AsyncClient` with a keep-alive pool of
`max_connections` serves every batch.

Failures: each input is tried once; 429, 5xx, connection errors and timeouts come back as a
retryable error `Generation` (with the server's `Retry-After`, when it sends one), other 4xx and
malformed answers as a final one, and `engine.retry`, the one retry policy around every
backend, decides about another attempt. Only when every input of the call failed to reach the
server at all (connection refused or connect timeout) is it a `BackendError`. A cancelled call
(the retry policy's deadline, a shutdown) closes its HTTP requests, which vLLM and trtllm-serve
take as an abort of the generation. Prompt-only requests may carry a stop string (`"stop"`).

The request's `"model"` is `served_model`, the name the server serves the model under
(trtllm-serve: the base name of the model folder it was started with, or the hub name; vLLM:
`--served-model-name`); it defaults to `model_id`, the name verdicts carry and cache keys hash.

`start()` probes `GET /v1/models` with a short timeout and only logs a warning when the server is
unreachable or does not list `served_model`: servers are often started after the service, and the
per-request retries cover the gap. The API key is sent as a bearer token and never logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from engine.backends.base import (
    Backend,
    BackendError,
    FinishReason,
    Generation,
    Stops,
    per_input_stops,
)

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
_CONNECT_FAILURES = (httpx.ConnectError, httpx.ConnectTimeout)


@dataclass(frozen=True, slots=True)
class _Outcome:
    generation: Generation
    #: The last attempt could not connect to the server at all.
    unreachable: bool = False


class _Retryable(Exception):
    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _error(message: str, *, retryable: bool = True, retry_after: float | None = None) -> Generation:
    return Generation(
        text="",
        tokens=None,
        finish_reason="error",
        error=message,
        retryable=retryable,
        retry_after=retry_after,
    )


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _parse_completion(body: Any) -> Generation:
    try:
        choice = body["choices"][0]
        text = choice["text"]
    except (KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"malformed completions response (no choices[0].text): {exc!r}") from exc
    if not isinstance(text, str):
        raise ValueError("malformed completions response: choices[0].text is not a string")
    usage = body.get("usage") if isinstance(body, dict) else None
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    tokens = tokens if isinstance(tokens, int) else None
    reason = choice.get("finish_reason")
    finish: FinishReason
    if reason == "length":
        finish = "length"
    elif reason in ("stop", "eos", None):
        finish = "stop"
    else:
        return Generation(
            text=text,
            tokens=tokens,
            finish_reason="error",
            error=f"server finish_reason {reason!r}",
        )
    return Generation(text=text, tokens=tokens, finish_reason=finish)


class OpenAIHttpBackend(Backend):
    name = "openai_http"
    batching = "inflight"

    def __init__(
        self,
        base_url: str,
        model_id: str,
        revision: str = "server",
        *,
        api_key: str | None = None,
        max_concurrency: int = 64,
        timeout_s: float = 120.0,
        max_connections: int = 64,
        served_model: str | None = None,
    ) -> None:
        super().__init__(model_id, revision)
        if served_model is not None and not served_model.strip():
            raise ValueError("served_model: expected a model name the server lists, got ''")
        self.served_model = served_model or model_id
        if max_concurrency < 1 or max_connections < 1:
            raise ValueError("max_concurrency and max_connections: expected >= 1")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s}")
        base = base_url.rstrip("/")
        # Accept both "http://host:8000" and "http://host:8000/v1".
        self.base_url = base[: -len("/v1")] if base.endswith("/v1") else base
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._api_key = api_key
        self._client: httpx.AsyncClient | None = None
        self._semaphore: asyncio.Semaphore | None = None

    def __repr__(self) -> str:  # never shows the API key
        return (
            f"OpenAIHttpBackend(base_url={self.base_url!r}, model_id={self.model_id!r}, "
            f"served_model={self.served_model!r})"
        )

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                headers=headers,
                # pool=None: waiting for a free connection is bounded by the semaphore instead.
                timeout=httpx.Timeout(self.timeout_s, pool=None),
                limits=httpx.Limits(
                    max_connections=self.max_connections,
                    max_keepalive_connections=self.max_connections,
                ),
            )
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
        await self._probe()

    async def _probe(self) -> None:
        assert self._client is not None
        try:
            response = await self._client.get("/v1/models", timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError as exc:
            log.warning(
                "completions server %s not reachable yet (%s); requests will retry",
                self.base_url,
                type(exc).__name__,
            )
            return
        if response.status_code != 200:
            log.warning("GET %s/v1/models answered %d", self.base_url, response.status_code)
            return
        try:
            ids = [m.get("id") for m in response.json().get("data", [])]
        except (ValueError, AttributeError):
            return
        if ids and self.served_model not in ids:
            log.warning(
                "server %s does not list model %r (it has %s; set GUARDSTREAM_OPENAI_SERVED_MODEL "
                "to one of them)",
                self.base_url,
                self.served_model,
                ids,
            )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # --- generation ----------------------------------------------------------------------------

    async def generate(
        self, inputs: Sequence[str], max_new_tokens: int, stop: Stops = None
    ) -> list[Generation]:
        if self._client is None or self._semaphore is None:
            raise BackendError("OpenAIHttpBackend.generate() called before start()")
        stops = per_input_stops(stop, len(inputs))
        # Cancelling this call (the guard's deadline, a shutdown) cancels each request: httpx
        # then closes its connection mid-request, which the server takes as an abort.
        outcomes = await asyncio.gather(
            *(
                self._complete(self._client, self._semaphore, p, max_new_tokens, s)
                for p, s in zip(inputs, stops, strict=True)
            )
        )
        if outcomes and all(o.unreachable for o in outcomes):
            raise BackendError(
                f"completions server {self.base_url} unreachable: all {len(outcomes)} requests "
                f"failed to connect ({outcomes[-1].generation.error})"
            )
        return [o.generation for o in outcomes]

    async def _complete(
        self,
        client: httpx.AsyncClient,
        semaphore: asyncio.Semaphore,
        prompt: str,
        max_new_tokens: int,
        stop: str | None,
    ) -> _Outcome:
        """One attempt; `engine.retry` decides about another."""
        body: dict[str, Any] = {
            "model": self.served_model,
            "prompt": prompt,
            "max_tokens": max_new_tokens,
            "temperature": 0,
            "top_p": 1,
        }
        if stop is not None:
            body["stop"] = [stop]
        try:
            async with semaphore:
                return _Outcome(await self._attempt(client, body))
        except _Retryable as exc:
            return _Outcome(_error(str(exc), retry_after=exc.retry_after))
        except _CONNECT_FAILURES as exc:
            return _Outcome(_error(f"cannot connect: {type(exc).__name__}: {exc}"), True)
        except httpx.TimeoutException as exc:
            return _Outcome(_error(f"timed out after {self.timeout_s}s ({type(exc).__name__})"))
        except httpx.TransportError as exc:
            return _Outcome(_error(f"transport error: {type(exc).__name__}: {exc}"))
        except ValueError as exc:  # malformed answer: retrying will not help
            return _Outcome(_error(str(exc), retryable=False))

    async def _attempt(self, client: httpx.AsyncClient, body: dict[str, Any]) -> Generation:
        response = await client.post("/v1/completions", json=body)
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Retryable(
                f"server answered {status}: {response.text[:200]}",
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        if status != 200:
            return _error(f"server answered {status}: {response.text[:200]}", retryable=False)
        return _parse_completion(response.json())
