"""The `openai_http` backend against a real local HTTP server speaking the completions API.

The server (tests/backends/completions_server.py) replays canned texts per prompt and can be
scripted to answer 429 with Retry-After, 500, or hang past the client's timeout. The backend
tries each input once and says whether another attempt may help; the retrying is
`engine.retry`'s (the one policy around every backend), so the retry tests go through it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator

import pytest

from engine.backends.base import BackendError, Generation
from engine.backends.openai_http import OpenAIHttpBackend, parse_retry_after
from engine.retry import RetryPolicy
from engine.retry import generate as generate_with_retries
from tests.backends.completions_server import CompletionsServer, Fault

REPLIES = {
    f"prompt-{i}": f"Answers: request {'harmful' if i % 2 else 'unharmful'} #{i}" for i in range(40)
}


@pytest.fixture
async def server() -> AsyncIterator[CompletionsServer]:
    srv = CompletionsServer(replies=dict(REPLIES))
    await srv.start()
    yield srv
    await srv.stop()


async def started(srv: CompletionsServer, **kwargs: object) -> OpenAIHttpBackend:
    options: dict[str, object] = {"timeout_s": 5.0, **kwargs}
    backend = OpenAIHttpBackend(srv.base_url, "guard", **options)  # type: ignore[arg-type]
    await backend.start()
    return backend


async def retried(
    backend: OpenAIHttpBackend, prompts: list[str], retries: int, timeout_s: float = 5.0
) -> list[Generation]:
    policy = RetryPolicy(retries=retries, backoff_s=0.01, timeout_s=timeout_s)
    return await generate_with_retries(backend, prompts, 64, policy=policy)


async def test_texts_come_back_in_order_with_the_greedy_request_body(
    server: CompletionsServer,
) -> None:
    prompts = ["prompt-3", "prompt-1", "prompt-2", "prompt-0"]
    server.delays.update({"prompt-3": 0.1, "prompt-1": 0.0, "prompt-2": 0.05})
    backend = await started(server)
    generations = await backend.generate(prompts, 2048)
    await backend.close()
    assert [g.text for g in generations] == [REPLIES[p] for p in prompts]
    assert all(g.finish_reason == "stop" and g.tokens == 7 for g in generations)
    body = server.requests_for("prompt-3")[0].body
    assert body == {
        "model": "guard",
        "prompt": "prompt-3",
        "max_tokens": 2048,
        "temperature": 0,
        "top_p": 1,
    }


async def test_concurrency_never_exceeds_max_concurrency(server: CompletionsServer) -> None:
    server.delay_s = 0.05
    backend = await started(server, max_concurrency=5)
    prompts = [f"prompt-{i}" for i in range(40)]
    generations = await backend.generate(prompts, 64)
    await backend.close()
    assert [g.text for g in generations] == [REPLIES[p] for p in prompts]
    assert 2 <= server.max_in_flight <= 5, server.max_in_flight


async def test_the_connection_pool_is_reused(server: CompletionsServer) -> None:
    backend = await started(server, max_concurrency=4)
    prompts = [f"prompt-{i}" for i in range(20)]
    await backend.generate(prompts, 64)
    await backend.generate(prompts[:8], 64)
    await backend.close()
    assert len(server.seen) == 28
    assert 1 <= len(server.connections) <= 4, server.connections


async def test_429_is_retried_after_retry_after(server: CompletionsServer) -> None:
    server.faults["prompt-1"] = [Fault(status=429, retry_after="1")]
    backend = await started(server)
    generations = await retried(backend, ["prompt-0", "prompt-1"], retries=2)
    await backend.close()
    assert [g.text for g in generations] == [REPLIES["prompt-0"], REPLIES["prompt-1"]]
    assert len(server.requests_for("prompt-0")) == 1, "only the failed input is tried again"
    first, second = server.requests_for("prompt-1")
    assert second.at - first.at >= 0.9, "Retry-After: 1 must be honoured (backoff_s is 0.01)"


async def test_a_persistent_500_becomes_an_error_generation(server: CompletionsServer) -> None:
    server.always["prompt-1"] = 500
    backend = await started(server)
    ok, bad = await retried(backend, ["prompt-0", "prompt-1"], retries=2)
    await backend.close()
    assert ok.finish_reason == "stop"
    assert bad.finish_reason == "error" and "500" in (bad.error or "")
    assert len(server.requests_for("prompt-1")) == 3, "1 try + 2 retries"


async def test_another_4xx_is_not_retried(server: CompletionsServer) -> None:
    server.always["prompt-1"] = 400
    backend = await started(server)
    [bad] = await retried(backend, ["prompt-1"], retries=3)
    await backend.close()
    assert bad.finish_reason == "error" and "400" in (bad.error or "")
    assert len(server.requests_for("prompt-1")) == 1


async def test_a_hang_times_out_is_retried_then_errors(server: CompletionsServer) -> None:
    server.faults["prompt-1"] = [Fault(hang=True), Fault(hang=True)]
    server.faults["prompt-2"] = [Fault(hang=True)]
    backend = await started(server, timeout_s=0.3)
    ok, hung, recovered = await retried(backend, ["prompt-0", "prompt-1", "prompt-2"], retries=1)
    await backend.close()
    assert ok.text == REPLIES["prompt-0"]
    assert hung.finish_reason == "error" and "timed out" in (hung.error or "")
    assert len(server.requests_for("prompt-1")) == 2
    assert recovered.text == REPLIES["prompt-2"], "one hang, then the retry succeeds"


async def test_bearer_token_is_sent_and_never_logged(
    server: CompletionsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.always["prompt-2"] = 503
    backend = await started(server, api_key="sekrit-token-123")
    await retried(backend, ["prompt-0", "prompt-2"], retries=1)
    await backend.close()
    assert {s.authorization for s in server.seen} == {"Bearer sekrit-token-123"}
    assert "sekrit-token-123" not in caplog.text
    assert "sekrit-token-123" not in repr(backend)


async def test_no_authorization_header_without_api_key(server: CompletionsServer) -> None:
    backend = await started(server)
    await backend.generate(["prompt-0"], 64)
    await backend.close()
    assert server.seen[0].authorization is None


async def test_length_finish_reason_is_kept(server: CompletionsServer) -> None:
    server.truncated.add("prompt-1")
    backend = await started(server)
    short, cut = await backend.generate(["prompt-0", "prompt-1"], 32)
    await backend.close()
    assert short.finish_reason == "stop"
    assert (cut.finish_reason, cut.tokens) == ("length", 32)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_unreachable_server_warns_at_start_and_fails_the_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = OpenAIHttpBackend(f"http://127.0.0.1:{_closed_port()}/v1", "guard")
    with caplog.at_level(logging.WARNING, logger="engine.backends.openai_http"):
        await backend.start()  # does not raise
    assert "not reachable" in caplog.text
    with pytest.raises(BackendError, match="unreachable"):
        await backend.generate(["prompt-0", "prompt-1"], 64)
    await backend.close()


async def test_start_warns_when_the_model_is_not_served(
    server: CompletionsServer, caplog: pytest.LogCaptureFixture
) -> None:
    backend = OpenAIHttpBackend(server.base_url, "other-model")
    with caplog.at_level(logging.WARNING, logger="engine.backends.openai_http"):
        await backend.start()
    await backend.close()
    assert "does not list model 'other-model'" in caplog.text


async def test_the_served_model_name_is_sent_and_probed_model_id_stays(
    server: CompletionsServer, caplog: pytest.LogCaptureFixture
) -> None:
    served = server.model = "GuardReasoner-1B"  # trtllm-serve lists a model folder's name
    unnamed = OpenAIHttpBackend(server.base_url, "org/GuardReasoner-1B")
    await unnamed.start()
    [refused] = await unnamed.generate(["prompt-5"], 16)
    await unnamed.close()
    assert refused.finish_reason == "error" and "404" in (refused.error or "")
    caplog.clear()
    backend = OpenAIHttpBackend(server.base_url, "org/GuardReasoner-1B", served_model=served)
    with caplog.at_level(logging.WARNING, logger="engine.backends.openai_http"):
        await backend.start()
    generations = await backend.generate(["prompt-5"], 16)
    await backend.close()
    assert "does not list" not in caplog.text
    assert generations[0].text == REPLIES["prompt-5"]
    assert server.requests_for("prompt-5")[0].body["model"] == served
    assert backend.model_id == "org/GuardReasoner-1B"  # what verdicts and cache keys carry
    with pytest.raises(ValueError, match="served_model"):
        OpenAIHttpBackend(server.base_url, "guard", served_model=" ")


def test_retry_after_parsing() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


async def test_a_stop_string_is_sent_per_input_and_the_text_ends_before_it(
    server: CompletionsServer,
) -> None:
    backend = await started(server)
    cut, whole = await backend.generate(["prompt-3", "prompt-4"], 64, [" #", None])
    await backend.close()
    assert server.requests_for("prompt-3")[0].body["stop"] == [" #"]
    assert "stop" not in server.requests_for("prompt-4")[0].body
    assert cut.text == REPLIES["prompt-3"].split(" #")[0] and cut.finish_reason == "stop"
    assert whole.text == REPLIES["prompt-4"]


async def test_a_cancelled_call_closes_its_requests_on_the_server(
    server: CompletionsServer,
) -> None:
    server.delays["prompt-1"] = 10.0
    backend = await started(server)
    call = asyncio.create_task(backend.generate(["prompt-0", "prompt-1"], 64))
    async with asyncio.timeout(5):
        while not server.requests_for("prompt-1"):
            await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    async with asyncio.timeout(5):  # the server sees the connection close: it stops generating
        while "prompt-1" not in server.aborted:
            await asyncio.sleep(0.01)
    await backend.close()
    assert server.aborted == ["prompt-1"]


async def test_the_retry_policys_deadline_aborts_the_request_before_its_retry(
    server: CompletionsServer,
) -> None:
    server.faults["prompt-1"] = [Fault(hang=True)]
    backend = await started(server, timeout_s=30.0)  # the client's own timeout is not it
    [gen] = await retried(backend, ["prompt-1"], retries=1, timeout_s=0.3)
    async with asyncio.timeout(5):
        while "prompt-1" not in server.aborted:
            await asyncio.sleep(0.01)
    await backend.close()
    assert gen.text == REPLIES["prompt-1"], "the retry after the deadline succeeds"
    first, second = server.requests_for("prompt-1")
    assert second.at - first.at >= 0.3
