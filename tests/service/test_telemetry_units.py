"""Telemetry pieces without a broker: log formatters and redaction, the logging config, health
checks, exporter selection."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import logging.config
import sys
import time
from typing import Any

import pytest
from faust.sensors import Monitor
from opentelemetry.sdk.trace import TracerProvider

from service.config import Settings, SettingsError
from service.telemetry.faust_monitor import QuietMonitor
from service.telemetry.logging import (
    JsonFormatter,
    Redactor,
    TextFormatter,
    logging_config,
    secret_values,
)
from service.telemetry.tracing import build_tracer_provider
from service.web import STALE_AFTER_S, Health


def _record(msg: str, *args: Any, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("guardstream.test", logging.INFO, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_line_carries_ids_and_the_current_trace() -> None:
    fmt = JsonFormatter()
    line = json.loads(fmt.format(_record("verdict %s", "ok", message_id="m1", offset=7)))
    assert line["message"] == "verdict ok" and line["level"] == "INFO"
    assert line["message_id"] == "m1" and line["offset"] == 7
    assert "trace_id" not in line  # no span, no trace id
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("s") as span:
        line = json.loads(fmt.format(_record("inside")))
    assert line["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert line["span_id"] == format(span.get_span_context().span_id, "016x")
    # an explicit trace id (the message's) wins over the current span
    line = json.loads(fmt.format(_record("x", trace_id="ab" * 16)))
    assert line["trace_id"] == "ab" * 16


def test_secrets_are_removed_from_lines_and_tracebacks() -> None:
    settings = Settings(
        replay_path="/x",
        redis_url="redis://user:hunter2-redis@cache:6379/0?password=q-pass-9",
        kafka_sasl_password="sasl-pw-77",
        openai_api_key="sk-key-55",
    )
    secrets = secret_values(settings)
    assert sorted(secrets) == ["hunter2-redis", "q-pass-9", "sasl-pw-77", "sk-key-55"]
    fmt = JsonFormatter(secrets)
    try:
        raise RuntimeError("login failed with sasl-pw-77")
    except RuntimeError:
        record = _record("connect %s key=%s", "redis://u:hunter2-redis@cache:6379", "sk-key-55")
        record.exc_info = sys.exc_info()
    out = fmt.format(record)
    for secret in secrets:
        assert secret not in out
    line = json.loads(out)
    assert line["message"] == "connect redis://u:***@cache:6379 key=***"
    assert "RuntimeError: login failed with ***" in line["exception"]
    # a password in any URL, even one not configured
    assert Redactor([])("to amqp://bob:s3cr3t@mq/") == "to amqp://bob:***@mq/"
    text = TextFormatter(secrets).format(_record("pw sasl-pw-77", message_id="m2"))
    assert "sasl-pw-77" not in text and "message_id=m2" in text


def test_logging_config_gives_json_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    root, handlers, level = logging.getLogger(), logging.getLogger().handlers[:], None
    level = root.level
    try:
        settings = Settings(replay_path="/x", log_level="DEBUG", openai_api_key="sk-zz-123")
        logging.config.dictConfig(logging_config(settings))
        logging.getLogger("guardstream.t").debug("hello %s", "sk-zz-123", extra={"kind": "prompt"})
        logging.getLogger("aiokafka.x").debug("protocol chatter")  # kept at INFO
        out = capsys.readouterr().out.strip().splitlines()
        assert len(out) == 1
        line = json.loads(out[0])
        assert line["message"] == "hello ***" and line["kind"] == "prompt"
        assert line["logger"] == "guardstream.t" and line["level"] == "DEBUG"
        text = Settings(replay_path="/x", log_format="text")
        logging.config.dictConfig(logging_config(text))
        logging.getLogger("guardstream.t").info("plain", extra={"message_id": "m3"})
        plain = capsys.readouterr().out
        assert "INFO" in plain and "guardstream.t: plain [message_id=m3]" in plain
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("aiokafka").setLevel(logging.NOTSET)


class _Flow:
    def is_active(self) -> bool:
        return True


class _Consumer:
    def __init__(self, assigned: set[Any]) -> None:
        self.assigned = assigned

    def assignment(self) -> set[Any]:
        return self.assigned


class _App:
    def __init__(self) -> None:
        self.consumer = _Consumer({("t", 0)})
        self.consumer_generation_id = 1  # Faust sets it from every group assignment
        self.rebalancing = False
        self.flow_control = _Flow()


class _Cache:
    def __init__(self) -> None:
        self.state = "closed"

    @property
    def available(self) -> bool:
        return self.state == "closed"


class _Guard:
    def __init__(self, cache: _Cache | None) -> None:
        self.cache = cache


@pytest.mark.parametrize("required", [True, False])
async def test_readiness_with_a_degraded_cache(required: bool) -> None:
    cache, loaded = _Cache(), asyncio.Event()
    settings = Settings(replay_path="/x", cache_required=required)
    health = Health(_App(), _Guard(cache), settings, loaded)  # type: ignore[arg-type]
    assert health.readiness()[0] is False  # engine not loaded yet
    loaded.set()
    ready, body = health.readiness()
    assert ready and body["cache"] == {
        "enabled": True,
        "required": required,
        "state": "closed",
        "degraded": False,
    }
    cache.state = "open"
    ready, body = health.readiness()
    assert ready is (not required)
    assert body["cache_ok"] is (not required) and body["cache"]["degraded"] is True
    health._app.rebalancing = True  # type: ignore[attr-defined]
    assert health.readiness()[1]["consuming"] is False


async def test_readiness_needs_the_group_joined_not_a_partition() -> None:
    app, loaded = _App(), asyncio.Event()
    loaded.set()
    health = Health(app, _Guard(None), Settings(replay_path="/x"), loaded)  # type: ignore[arg-type]
    app.consumer_generation_id = 0  # not joined yet
    ready, body = health.readiness()
    assert ready is False and body["kafka_joined"] is False and body["consuming"] is False
    app.consumer_generation_id = 3
    app.consumer.assigned = set()  # joined, no partition: a hot spare
    ready, body = health.readiness()
    assert ready is True and body["kafka_partitions"] == 0
    app.consumer.assigned = {("t", 0), ("t", 1)}
    assert health.readiness()[1]["kafka_partitions"] == 2


def test_liveness_turns_stale_without_heartbeats() -> None:
    health = Health(_App(), _Guard(None), Settings(replay_path="/x"), asyncio.Event())  # type: ignore[arg-type]
    health.beat()
    assert health.liveness()[0] is True
    health.last_beat = time.monotonic() - STALE_AFTER_S - 1
    alive, body = health.liveness()
    assert alive is False and body["status"] == "stale"
    health.last_beat = time.monotonic() - 3.5  # one beat came 2.5 s late
    health.beat()
    assert health.loop_lag_s == pytest.approx(2.5, abs=0.2)


def test_tracing_is_off_by_default_and_otlp_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    assert build_tracer_provider(Settings(replay_path="/x")) is None
    console = build_tracer_provider(Settings(replay_path="/x", traces_exporter="console"))
    assert console is not None
    console.shutdown()
    for protocol in ("grpc", "http"):
        otlp = Settings(
            replay_path="/x",
            traces_exporter="otlp",
            otlp_protocol=protocol,
            otlp_endpoint="http://127.0.0.1:1",
        )
        provider = build_tracer_provider(otlp)
        assert provider is not None
        provider.shutdown()
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", None)
    with pytest.raises(
        SettingsError, match=r"GUARDSTREAM_TRACES_EXPORTER=otlp.*guardstream\[otlp\]"
    ):
        build_tracer_provider(Settings(replay_path="/x", traces_exporter="otlp"))


def test_metrics_exporter_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.telemetry import Telemetry
    from service.telemetry.metrics import Metrics

    settings = Settings(replay_path="/x", traces_exporter="console")
    assert Metrics(settings).registry is not None  # prometheus by default
    off = Telemetry.off(settings)
    assert off.tracer is None and off.metrics.registry is None
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.metric_exporter", None)
    otlp = Settings(replay_path="/x", metrics_exporter="otlp", otlp_protocol="http")
    with pytest.raises(SettingsError, match=r"GUARDSTREAM_METRICS_EXPORTER=otlp"):
        Metrics(otlp)


def test_quiet_monitor_silences_exactly_faust_per_message_hooks() -> None:
    """Each hook QuietMonitor replaces must exist on Faust's Monitor with the same parameters (a
    renamed hook would silently bring the bookkeeping back), and the replaced hooks keep no
    state, while the rest (commits here) still records."""
    replaced = {n for n in vars(QuietMonitor) if n.startswith("on_")}
    assert replaced == {
        "on_message_in",
        "on_stream_event_in",
        "on_stream_event_out",
        "on_message_out",
        "on_send_initiated",
        "on_send_completed",
        "on_send_error",
    }
    for name in replaced:
        ours, theirs = getattr(QuietMonitor, name), getattr(Monitor, name)
        assert list(inspect.signature(ours).parameters) == list(
            inspect.signature(theirs).parameters
        ), name

    class Message:
        time_in = None

    monitor = QuietMonitor()
    message = Message()
    monitor.on_message_in(("t", 0), 1, message)
    assert monitor.on_stream_event_in(("t", 0), 1, object(), object()) is None
    assert monitor.messages_received_total == 0 and message.time_in is None
    assert monitor.on_send_initiated(None, "t", object(), 1, 2) is None
    assert monitor.messages_sent == 0
    state = monitor.on_commit_initiated(None)
    monitor.on_commit_completed(None, state)
    assert len(monitor.commit_latency) == 1


async def test_the_worker_app_runs_with_the_quiet_monitor(tmp_path: Any) -> None:
    from engine.backends.replay import ReplayBackend
    from engine.guard import Guard
    from service.app import Runtime

    (tmp_path / "x.jsonl").write_text("")
    settings = Settings(replay_path=tmp_path, metrics_exporter="none", app_id="gs-quiet-test")
    runtime = Runtime(settings, Guard(ReplayBackend(tmp_path)), partitions=1)
    assert isinstance(runtime.app.monitor, QuietMonitor)
