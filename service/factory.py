"""Builds the engine's parts from `Settings`: backend, cache, guard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry.trace import Tracer

from engine.backends.base import Backend
from engine.cache import RedisVerdictCache, VerdictCache
from engine.cascade import DEFAULT_POLICY, EscalationPolicy
from engine.guard import BatchHook, Cascade, Guard
from engine.retry import RetryPolicy
from service.config import Settings


def build_backend(settings: Settings) -> Backend:
    """The configured backend; heavy libraries are imported by the backend's own module."""
    revision = settings.model_revision
    if settings.engine == "replay":
        from engine.backends.replay import ReplayBackend

        assert settings.replay_path is not None
        return ReplayBackend(settings.replay_path, model_id=settings.model, revision=revision)
    if settings.engine == "hf":
        from engine.backends.hf import HfBackend

        assert settings.hf_model_path is not None
        return HfBackend(
            settings.hf_model_path,
            model_id=settings.model,
            revision=revision,
            device=settings.hf_device,
            max_batch_size=settings.batch_max_size,
        )
    if settings.engine == "openai_http":
        from engine.backends.openai_http import OpenAIHttpBackend

        assert settings.openai_base_url is not None
        assert revision, "Settings require model_revision with openai_http"
        key = settings.openai_api_key
        return OpenAIHttpBackend(
            settings.openai_base_url,
            settings.model,
            revision,
            api_key=key.get_secret_value() if key else None,
            # Unset: the guard's budget of sequences, so that neither bound hides the other.
            max_concurrency=settings.openai_max_concurrency or settings.engine_max_sequences,
            max_connections=settings.openai_max_concurrency or settings.engine_max_sequences,
            timeout_s=settings.engine_timeout_s,
            served_model=settings.openai_served_model,
        )
    from engine.backends.trtllm import TrtllmBackend

    return TrtllmBackend(
        settings.model,
        revision,  # None: derived from the engine (or checkpoint) it loads, at start
        engine_dir=settings.trtllm_engine_dir,
        checkpoint_dir=settings.trtllm_checkpoint_dir,
        runtime=settings.trtllm_runtime,
        build_on_start=settings.trtllm_build_on_start,
        kv_cache_free_gpu_memory_fraction=settings.trtllm_kv_cache_free_gpu_memory_fraction,
        # The engine's own bound on sequences decoding at once: the guard's budget.
        max_batch_size=settings.engine_max_sequences,
    )


def build_cache(
    settings: Settings, *, on_state_change: Callable[[str], None] | None = None
) -> VerdictCache | None:
    """The Redis cache, or None; `on_state_change` hears its breaker's transitions (the worker
    turns them into a metric and a log line)."""
    if not settings.cache_enabled:
        return None
    return RedisVerdictCache(
        settings.redis_url.get_secret_value(),
        ttl_s=settings.cache_ttl_s,
        timeout_s=settings.cache_timeout_ms / 1000,
        on_state_change=on_state_change,
    )


def guard_options(settings: Settings) -> dict[str, Any]:
    """The Guard's keyword arguments from the settings (every way of running a guard uses
    these: the worker, `guardstream moderate`)."""
    return {
        "max_batch_size": settings.batch_max_size,
        "max_wait_ms": settings.batch_max_wait_ms,
        "max_in_flight": settings.batch_max_in_flight,
        "max_new_tokens": settings.max_new_tokens,
        "max_text_chars": settings.max_text_chars,
        "retries": settings.engine_retries,
        "timeout_s": settings.engine_timeout_s,
        "admission": settings.admission,
        "max_sequences": settings.engine_max_sequences,
        "early_exit": settings.early_exit,
    }


def build_cascade(settings: Settings, second: Backend | None = None) -> Cascade | None:
    """The cascade's second model and policy (GUARDSTREAM_ESCALATE_*), or None."""
    escalation = settings.escalation_settings()
    if escalation is None:
        return None
    policy = (
        EscalationPolicy.parse(settings.escalate_policy)
        if settings.escalate_policy is not None
        else DEFAULT_POLICY
    )
    retry = RetryPolicy(retries=settings.escalate_retries, timeout_s=settings.escalate_timeout_s)
    return Cascade(
        second or build_backend(escalation),
        policy,
        max_sequences=settings.escalate_max_sequences,
        retry=retry,
    )


def build_guard(
    settings: Settings,
    backend: Backend | None = None,
    *,
    second: Backend | None = None,
    on_batch: BatchHook | None = None,
    tracer: Tracer | None = None,
    on_cache_state: Callable[[str], None] | None = None,
) -> Guard:
    """The guard; `backend` and `second` replace the configured first and second models
    (tests and benchmarks)."""
    return Guard(
        backend or build_backend(settings),
        cache=build_cache(settings, on_state_change=on_cache_state),
        cascade=build_cascade(settings, second),
        on_batch=on_batch,
        tracer=tracer,
        **guard_options(settings),
    )
