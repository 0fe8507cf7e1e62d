"""The one retry policy around every backend: which failures, how many attempts, what wait.

Backends make one attempt per input and say how it went; they never loop. `generate` (what the
guard calls) runs the attempts:

- **What is retried**: a call that raised (a `BackendError`, a timeout, a lost connection: the
  whole call is tried again), and each input whose `Generation` is an error with `retryable`
  set (a 429, a 5xx, a timeout or a transport error of that input alone; only those inputs are
  tried again). An error with `retryable=False` (a 4xx other than 429, an input the engine
  rejects as too long, a malformed answer) is final at once: retrying cannot mend it.
- **How many**: `retries` more attempts after the first.
- **How long between**: exponential backoff with jitter (`backoff_s`, doubling, at most
  `max_backoff_s`, plus up to `backoff_s` of random jitter so that many workers do not retry in
  step), or longer when the server asked for it (`Retry-After`, capped at `max_retry_after_s`).
- **Each attempt has a deadline** (`timeout_s`): on expiry the call is cancelled, and a backend
  stops a cancelled call's generation in the engine (TensorRT-LLM's request abort; the HTTP
  request closed, which vLLM and trtllm-serve take as an abort) before it is tried again, so a
  retry never runs beside its own abandoned first try.
- **Poison isolation**: when every attempt of a call of several inputs failed as a whole, each of
  its inputs is tried once on its own, so that one input that breaks the engine cannot take its
  neighbours down with it.

Inputs that still fail come back as error Generations: the caller applies its failure policy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tenacity.wait import wait_base

from engine.backends.base import Backend, Generation, Stops, per_input_stops

log = logging.getLogger("guardstream.retry")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retries: int = 2
    backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    max_retry_after_s: float = 60.0
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries: expected >= 0, got {self.retries}")
        if self.backoff_s < 0 or self.max_backoff_s < 0 or self.max_retry_after_s < 0:
            raise ValueError("backoff_s, max_backoff_s and max_retry_after_s: expected >= 0")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s: expected > 0, got {self.timeout_s}")


class _Unfinished(Exception):
    """Some inputs of an attempt failed in a way worth another attempt."""

    def __init__(self, error: str, retry_after: float | None) -> None:
        super().__init__(error)
        self.retry_after = retry_after


class _WaitOrRetryAfter(wait_base):
    """Exponential backoff with jitter, or the server's Retry-After when that is longer."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._backoff = wait_exponential_jitter(
            multiplier=policy.backoff_s, max=policy.max_backoff_s, jitter=policy.backoff_s
        )
        self._cap = policy.max_retry_after_s

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = float(self._backoff(retry_state))
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        hint = getattr(exc, "retry_after", None)
        if isinstance(hint, (int, float)):
            wait = max(wait, min(float(hint), self._cap))
        return wait


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "engine timed out"
    return f"{type(exc).__name__}: {exc}"


def _failed(error: str) -> Generation:
    return Generation("", finish_reason="error", error=error, retryable=False)


async def call_once(
    backend: Backend,
    inputs: Sequence[str],
    max_new_tokens: int,
    stop: Stops,
    timeout_s: float,
) -> list[Generation]:
    """One attempt under its deadline; a backend that breaks the one-output-per-input contract
    raises here."""
    async with asyncio.timeout(timeout_s):
        gens = await backend.generate(inputs, max_new_tokens, stop)
    if len(gens) != len(inputs):
        raise RuntimeError(f"backend returned {len(gens)} outputs for {len(inputs)} inputs")
    return gens


async def generate(
    backend: Backend,
    inputs: Sequence[str],
    max_new_tokens: int,
    stop: Stops = None,
    *,
    policy: RetryPolicy,
) -> list[Generation]:
    """Generate for every input under `policy` (see the module docstring); one Generation per
    input, in order, errors included. Never raises for an engine failure."""
    stops = per_input_stops(stop, len(inputs))
    out: list[Generation | None] = [None] * len(inputs)
    pending = list(range(len(inputs)))
    whole_call_failed: str | None = None

    async def attempt() -> None:
        nonlocal pending, whole_call_failed
        try:
            gens = await call_once(
                backend,
                [inputs[i] for i in pending],
                max_new_tokens,
                [stops[i] for i in pending] if stop is not None else None,
                policy.timeout_s,
            )
        except Exception as exc:  # any engine failure of the call is retried
            whole_call_failed = describe(exc)
            raise _Unfinished(whole_call_failed, getattr(exc, "retry_after", None)) from exc
        whole_call_failed = None
        again: list[int] = []
        hints: list[float] = []
        for i, gen in zip(pending, gens, strict=True):
            out[i] = gen
            if gen.finish_reason == "error" and gen.retryable:
                again.append(i)
                if gen.retry_after is not None:
                    hints.append(gen.retry_after)
        pending = again
        if pending:
            first = out[pending[0]]
            error = first.error if first is not None and first.error else "engine error"
            raise _Unfinished(error, max(hints) if hints else None)

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.warning(
            "engine failed on %d of %d inputs (attempt %d of %d): %s",
            len(pending),
            len(inputs),
            state.attempt_number,
            policy.retries + 1,
            exc,
        )

    retrying = AsyncRetrying(
        stop=stop_after_attempt(policy.retries + 1),
        wait=_WaitOrRetryAfter(policy),
        retry=retry_if_exception_type(_Unfinished),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        await retrying(attempt)
    except _Unfinished:
        pass
    if whole_call_failed is not None:
        if len(pending) > 1:
            singles = await asyncio.gather(
                *(
                    call_once(backend, [inputs[i]], max_new_tokens, [stops[i]], policy.timeout_s)
                    for i in pending
                ),
                return_exceptions=True,
            )
            for i, single in zip(pending, singles, strict=True):
                if isinstance(single, BaseException):
                    out[i] = _failed(describe(single))
                else:
                    out[i] = single[0]
        else:
            for i in pending:
                out[i] = _failed(whole_call_failed)
    return [g if g is not None else _failed("no output") for g in out]
