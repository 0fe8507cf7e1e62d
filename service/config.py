"""guardstream's settings: one pydantic-settings object, environment prefix `GUARDSTREAM_`.

Built once at the edge (`Settings.from_env()`), validated at start, passed down. A wrong value
fails at start with a `SettingsError` that names the environment variable and what it expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.decode import OPTIONAL_FIELDS, InputLimits

ENV_PREFIX = "GUARDSTREAM_"


class SettingsError(Exception):
    """A setting is wrong; the message names the variable and the value expected."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # --- Kafka -------------------------------------------------------------------------------
    app_id: str = Field("guardstream", min_length=1, description="Faust app id = consumer group")
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    topic_prompts: str = "chat.prompts"
    topic_responses: str = "chat.responses"
    topic_verdicts: str = "moderation.verdicts"
    topic_flagged: str = "moderation.flagged"
    topic_dlq: str = "moderation.dlq"
    topic_partitions: int = Field(8, ge=1, description="Partitions of topics guardstream creates")
    topic_replication_factor: int = Field(1, ge=1, description="Replicas of topics it creates")
    processing_guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    moderate: Literal["prompts", "responses", "both"] = "both"

    # --- pairing -----------------------------------------------------------------------------
    #: Grace of the event-time join: a response waits for its prompt until the prompts stream
    #: (of each partition the prompt can be in) has passed the response's timestamp by this much.
    pairing_wait_ms: int = Field(5000, ge=0, description="Event-time grace for a late prompt")
    #: Upper bound, wall clock, on a response's wait for its prompt (a prompts partition that
    #: this worker does not hold never moves on here).
    pairing_max_wait_s: float = Field(120.0, gt=0)
    prompt_table_ttl_s: int = Field(3600, ge=1)
    prompt_table_max: int = Field(100_000, ge=1)

    # --- engine ------------------------------------------------------------------------------
    engine: Literal["trtllm", "hf", "openai_http", "replay"] = "replay"
    model: str = "yueliu1999/GuardReasoner-1B"
    model_revision: str | None = None
    replay_path: Path | None = None
    hf_model_path: Path | None = None
    hf_device: Literal["auto", "cpu", "cuda"] = "auto"
    trtllm_engine_dir: Path | None = None
    trtllm_checkpoint_dir: Path | None = None
    trtllm_runtime: Literal["engine", "pytorch"] = "engine"
    trtllm_build_on_start: bool = False
    trtllm_kv_cache_free_gpu_memory_fraction: float = Field(0.85, gt=0, le=1)
    openai_base_url: str | None = None
    openai_api_key: SecretStr | None = None
    #: Requests in flight to the server at once; unset: engine_max_sequences.
    openai_max_concurrency: int | None = Field(None, ge=1)
    #: The name the completions server serves the model under, sent as the request's "model";
    #: unset: GUARDSTREAM_MODEL.
    openai_served_model: str | None = Field(None, min_length=1)
    max_new_tokens: int = Field(2048, ge=1)
    batch_max_size: int = Field(32, ge=1)
    batch_max_wait_ms: float = Field(20.0, ge=0)
    batch_max_in_flight: int = Field(2, ge=1)
    #: How misses reach the model: `request` hands each one to the engine on its own as soon
    #: as one of `engine_max_sequences` places is free (in-flight-batching engines: trtllm,
    #: openai_http); `batch` sends micro-batches of `batch_max_size`, `batch_max_in_flight` at
    #: a time (static-batching engines: hf, replay); `auto` picks by the backend's kind.
    admission: Literal["auto", "batch", "request"] = "auto"
    #: Sequences the guard keeps running in an in-flight engine at once (per-request admission):
    #: the engine's own `max_batch_size` (TensorRT-LLM) or its server's max sequences (vLLM's
    #: --max-num-seqs). The chart sets it per model size.
    engine_max_sequences: int = Field(256, ge=1)
    #: Prompt-only requests stop generating before the model's Task 2 (see README, Evaluation);
    #: a request whose Task 1 cannot be read is generated again in full.
    early_exit: bool = True
    engine_retries: int = Field(2, ge=0)
    engine_timeout_s: float = Field(120.0, gt=0)
    policy: Literal["fail_closed", "fail_open"] = "fail_closed"

    # --- cascade: a second model asked only where the first one's output cannot be trusted ---
    #: The second model's engine; unset: no cascade. Its settings are the ESCALATE_ ones below,
    #: read as the first model's are (e.g. ESCALATE_REPLAY_PATH for `replay`).
    escalate_engine: Literal["trtllm", "hf", "openai_http", "replay"] | None = None
    escalate_model: str | None = Field(None, min_length=1)
    escalate_model_revision: str | None = None
    escalate_replay_path: Path | None = None
    escalate_hf_model_path: Path | None = None
    escalate_trtllm_engine_dir: Path | None = None
    escalate_trtllm_checkpoint_dir: Path | None = None
    escalate_openai_base_url: str | None = None
    escalate_openai_api_key: SecretStr | None = None
    escalate_openai_served_model: str | None = Field(None, min_length=1)
    #: Which signals of the first output send a request on (engine.cascade.SIGNALS, joined by
    #: commas); unset: engine.cascade.DEFAULT_POLICY.
    escalate_policy: str | None = None
    #: Sequences (per-request admission) or batch places the second model gets at once: its
    #: own budget, so that a slow second model holds back only the requests sent to it.
    escalate_max_sequences: int = Field(64, ge=1)
    #: The second model's retries and per-attempt deadline: an escalated request waits about
    #: (retries + 1) x timeout at most before the first verdict is published, marked.
    escalate_retries: int = Field(0, ge=0)
    escalate_timeout_s: float = Field(30.0, gt=0)
    #: Shadow mode, for a trial before enforcement: every verdict still goes to the verdicts
    #: topic (with `flagged` as it would be), with the header `guardstream-shadow: 1`, but none
    #: to the flagged topic, which is what enforcing consumers read.
    shadow: bool = False

    # --- input limits ------------------------------------------------------------------------
    max_message_bytes: int = Field(1_048_576, gt=0)
    max_text_chars: int = Field(32_000, gt=0)
    over_limit: Literal["truncate", "reject"] = "truncate"
    required_fields: frozenset[str] = frozenset()

    # --- cache -------------------------------------------------------------------------------
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    cache_enabled: bool = True
    cache_required: bool = False
    cache_ttl_s: int = Field(7 * 24 * 3600, ge=1)
    cache_timeout_ms: float = Field(200.0, gt=0)

    # --- web, telemetry, lifecycle -----------------------------------------------------------
    web_host: str = "0.0.0.0"  # noqa: S104 - a pod serves its probes on all interfaces
    web_port: int = Field(6066, ge=1, le=65535)
    grace_period_s: float = Field(30.0, gt=0)
    #: Events held per input topic (waiting for the model, a prompt or the broker): when full,
    #: the agent takes no more (backpressure through to Kafka).
    max_pending: int = Field(2048, ge=1)
    #: A publishing lane whose produce keeps failing this long makes the worker unready.
    publish_stall_s: float = Field(60.0, gt=0)
    #: How long the group waits for a member that stopped heart-beating (a killed pod) before
    #: its partitions move to the others: the failover time after a crash. Kafka's broker
    #: accepts 6 s to 30 min by default.
    kafka_session_timeout_s: float = Field(20.0, ge=6, le=1800)
    traces_exporter: Literal["none", "console", "otlp"] = "none"
    metrics_exporter: Literal["prometheus", "otlp", "none"] = "prometheus"
    otlp_endpoint: str | None = None
    otlp_protocol: Literal["grpc", "http"] = "grpc"
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_content: bool = Field(False, description="Log message text (debug only)")

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        unknown = self.required_fields - OPTIONAL_FIELDS
        if unknown:
            raise ValueError(
                f"required_fields: unknown field(s) {sorted(unknown)}; "
                f"expected any of {sorted(OPTIONAL_FIELDS)}"
            )
        if self.engine == "replay" and self.replay_path is None:
            raise ValueError("replay_path: required when engine is 'replay'")
        if self.engine == "openai_http" and not self.openai_base_url:
            raise ValueError("openai_base_url: required when engine is 'openai_http'")
        if self.engine == "openai_http" and not self.model_revision:
            raise ValueError(
                "model_revision: required when engine is 'openai_http' (the checkpoint's commit "
                "or digest on the server: it keys the verdict cache, so that a new checkpoint "
                "never reads the old one's verdicts)"
            )
        if self.engine == "hf" and self.hf_model_path is None:
            raise ValueError("hf_model_path: required when engine is 'hf'")
        if self.engine == "trtllm" and not (self.trtllm_engine_dir or self.trtllm_checkpoint_dir):
            raise ValueError(
                "trtllm_engine_dir: required (or trtllm_checkpoint_dir) when engine is 'trtllm'"
            )
        if self.escalate_engine is not None:
            self._check_escalation()
        if self.kafka_security_protocol.startswith("SASL") and not self.kafka_sasl_username:
            raise ValueError("kafka_sasl_username: required with a SASL security protocol")
        return self

    def _check_escalation(self) -> None:
        from engine.cascade import EscalationPolicy

        engine = self.escalate_engine
        if not self.escalate_model:
            raise ValueError(f"escalate_model: required when escalate_engine is {engine!r}")
        needs = {
            "replay": ("escalate_replay_path", self.escalate_replay_path),
            "hf": ("escalate_hf_model_path", self.escalate_hf_model_path),
            "openai_http": ("escalate_openai_base_url", self.escalate_openai_base_url),
            "trtllm": (
                "escalate_trtllm_engine_dir",
                self.escalate_trtllm_engine_dir or self.escalate_trtllm_checkpoint_dir,
            ),
        }
        name, value = needs[engine or "replay"]
        if not value:
            raise ValueError(f"{name}: required when escalate_engine is {engine!r}")
        if engine == "openai_http" and not self.escalate_model_revision:
            raise ValueError(
                "escalate_model_revision: required when escalate_engine is 'openai_http' (the "
                "second checkpoint's commit or digest: it keys the cascade's verdict cache)"
            )
        if self.escalate_policy is not None:
            try:
                EscalationPolicy.parse(self.escalate_policy)
            except ValueError as exc:
                raise ValueError(f"escalate_policy: {exc}") from None

    def escalation_settings(self) -> Settings | None:
        """The second model's settings (its ESCALATE_ values in the first model's places), or
        None without a cascade."""
        if self.escalate_engine is None:
            return None
        return self.model_copy(
            update={
                "engine": self.escalate_engine,
                "model": self.escalate_model,
                "model_revision": self.escalate_model_revision,
                "replay_path": self.escalate_replay_path,
                "hf_model_path": self.escalate_hf_model_path,
                "trtllm_engine_dir": self.escalate_trtllm_engine_dir,
                "trtllm_checkpoint_dir": self.escalate_trtllm_checkpoint_dir,
                "openai_base_url": self.escalate_openai_base_url,
                "openai_api_key": self.escalate_openai_api_key,
                "openai_served_model": self.escalate_openai_served_model,
                "openai_max_concurrency": None,
                "engine_max_sequences": self.escalate_max_sequences,
                "escalate_engine": None,
            }
        )

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Read the environment; raise SettingsError naming each wrong variable."""
        try:
            return cls(**overrides)  # type: ignore[arg-type]
        except ValidationError as exc:
            raise SettingsError(_describe(exc)) from None

    @property
    def input_limits(self) -> InputLimits:
        return InputLimits(
            max_message_bytes=self.max_message_bytes,
            max_text_chars=self.max_text_chars,
            over_limit=self.over_limit,
            required_fields=self.required_fields,
        )


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        msg = err["msg"]
        if not loc and msg.startswith("Value error, "):
            # model-level checks put the field name first: "field: message"
            msg = msg.removeprefix("Value error, ")
            field, _, rest = msg.partition(": ")
            lines.append(f"{ENV_PREFIX}{field.upper()}: {rest}")
            continue
        name = ENV_PREFIX + "_".join(loc).upper()
        given = err.get("input")
        shown = (
            "(secret)" if "password" in name or "key" in name or "url" in name.lower() else given
        )
        lines.append(f"{name}: {msg} (got {shown!r})")
    return "invalid settings:\n  " + "\n  ".join(lines)
