"""guardstream's metrics, with the OpenTelemetry metrics SDK.

Counters are tallied in plain dicts on the hot path and reported through observable counters at
collection time (an SDK `Counter.add` costs microseconds per call); the engine's own counters
(guard, cache, batcher stats) are read the same way. Only latencies and sizes are recorded per
event, into histograms. Readers: Prometheus (a private registry, served on the worker's
`/metrics`) and/or OTLP, by GUARDSTREAM_METRICS_EXPORTER; tests add an InMemoryMetricReader.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    MeterProvider,
    TraceBasedExemplarFilter,
)
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from prometheus_client import CollectorRegistry

from engine.guard import Guard
from service.config import Settings, SettingsError
from service.telemetry.tracing import resource

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_WAIT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

Tally = Counter[tuple[str, ...]]


def _observe(tally: Tally, names: Sequence[str]) -> Callable[[CallbackOptions], Iterable[Any]]:
    def callback(_options: CallbackOptions) -> Iterable[Observation]:
        items = list(tally.items())  # one C-level copy: OTLP export collects from its thread
        return [Observation(n, dict(zip(names, key, strict=True))) for key, n in items]

    return callback


def _otlp_reader(settings: Settings) -> MetricReader:
    try:
        if settings.otlp_protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter as GrpcExporter,
            )

            return PeriodicExportingMetricReader(GrpcExporter(endpoint=settings.otlp_endpoint))
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpExporter,
        )

        endpoint = settings.otlp_endpoint
        if endpoint and not endpoint.rstrip("/").endswith("/v1/metrics"):
            endpoint = endpoint.rstrip("/") + "/v1/metrics"
        return PeriodicExportingMetricReader(HttpExporter(endpoint=endpoint))
    except ImportError as err:
        raise SettingsError(
            f"GUARDSTREAM_METRICS_EXPORTER=otlp needs the OTLP exporter, which is not installed "
            f"({err.name}): pip install 'guardstream[otlp]', or set "
            "GUARDSTREAM_METRICS_EXPORTER=prometheus or none"
        ) from None


class Metrics:
    """The instruments, their tallies, and the readers that export them."""

    def __init__(
        self,
        settings: Settings,
        *,
        readers: Sequence[MetricReader] = (),
        exemplars: bool = False,
    ) -> None:
        all_readers = list(readers)
        self.registry: CollectorRegistry | None = None
        if settings.metrics_exporter == "prometheus":
            from opentelemetry.exporter.prometheus import PrometheusMetricReader

            self.registry = CollectorRegistry()
            all_readers.append(
                PrometheusMetricReader(
                    disable_target_info=True, scope_info_enabled=False, registry=self.registry
                )
            )
        elif settings.metrics_exporter == "otlp":
            all_readers.append(_otlp_reader(settings))
        self.provider = MeterProvider(
            metric_readers=all_readers,
            resource=resource(settings),
            exemplar_filter=TraceBasedExemplarFilter() if exemplars else AlwaysOffExemplarFilter(),
        )
        self._guard: Guard | None = None
        self._lag: Callable[[], Mapping[tuple[str, int], int]] | None = None
        self.loop_lag_s = 0.0
        topics = (settings.topic_prompts, settings.topic_responses)
        self.consumed: Tally = Counter({(t,): 0 for t in topics})  # known series start at 0
        self.verdicts: Tally = Counter()
        self.labels: Tally = Counter()
        self.flagged: Tally = Counter({("prompt",): 0, ("response",): 0})
        self.dead_letters: Tally = Counter()
        self.cache_changes: Tally = Counter()
        self.pairing: Tally = Counter()
        #: (topic, partitioner) of inputs outside their conversation's murmur2 partition; the
        #: processor's PartitionCheck replaces it with its own tally.
        self.misrouted: Tally = Counter()
        self._instruments()

    # --- set-up ------------------------------------------------------------------------------

    def watch_guard(self, guard: Guard) -> None:
        """Report the guard's, its cache's and its batcher's counters."""
        self._guard = guard

    def watch_lag(self, lag: Callable[[], Mapping[tuple[str, int], int]]) -> None:
        self._lag = lag

    def _instruments(self) -> None:
        m = self.provider.get_meter("guardstream")
        counter, gauge = m.create_observable_counter, m.create_observable_gauge
        counter(
            "guardstream_messages_consumed",
            [_observe(self.consumed, ["topic"])],
            unit="{message}",
            description="Input messages consumed, per topic.",
        )
        counter(
            "guardstream_verdicts",
            [_observe(self.verdicts, ["kind", "trust"])],
            unit="{verdict}",
            description="Verdicts published (broker-acknowledged), per kind and trust state "
            "(final, recovered: trusted; incomplete, conflicting, unparsed, truncated, "
            "engine_error: flagged under fail_closed).",
        )
        counter(
            "guardstream_verdict_labels",
            [_observe(self.labels, ["kind", "task", "label"])],
            unit="{verdict}",
            description="Labels in published verdicts, per kind, task and label.",
        )
        counter(
            "guardstream_flagged",
            [_observe(self.flagged, ["kind"])],
            unit="{verdict}",
            description="Flagged verdicts published, per kind.",
        )
        counter(
            "guardstream_dead_letters",
            [_observe(self.dead_letters, ["reason"])],
            unit="{message}",
            description="Inputs published to the dead-letter topic, per reason.",
        )
        counter(
            "guardstream_pairing",
            [_observe(self.pairing, ["outcome"])],
            unit="{response}",
            description="Responses by how they were paired: inline, table (prompt already "
            "stored), waited (it came later), passed (the prompts stream passed the response's "
            "time without it), timeout (PAIRING_MAX_WAIT_S ran out).",
        )
        counter(
            "guardstream_misrouted",
            [lambda _o: _observe(self.misrouted, ["topic", "partitioner"])(_o)],
            unit="{message}",
            description="Inputs not in the partition their conversation id hashes to (murmur2), "
            "per topic and the partitioner they match (crc32: librdkafka's default; other).",
        )
        counter(
            "guardstream_cache_state_changes",
            [_observe(self.cache_changes, ["state"])],
            unit="{change}",
            description="Verdict cache breaker transitions, per new state.",
        )
        for name, what, description in (
            ("guardstream_cache_hits", "hits", "Verdict cache lookups answered with a verdict."),
            ("guardstream_cache_misses", "misses", "Verdict cache lookups without a verdict."),
            ("guardstream_cache_errors", "errors", "Verdict cache calls that failed."),
        ):
            counter(name, [self._cache_stat(what)], unit="{key}", description=description)
        counter(
            "guardstream_tokens_generated",
            [self._guard_stat("tokens")],
            unit="{token}",
            description="Tokens generated by the model.",
        )
        counter(
            "guardstream_engine_errors",
            [self._guard_stat("engine_errors")],
            unit="{request}",
            description="Requests the engine failed on after retries.",
        )
        counter(
            "guardstream_escalations",
            [self._escalations],
            unit="{request}",
            description="Requests a guard cascade sent to its second model, per signal (reason) "
            "and outcome (answered: the second model's verdict; failed: it failed, the first "
            "model's verdict stands, marked).",
        )
        counter(
            "guardstream_early_exits",
            [self._guard_stat("early_exits")],
            unit="{request}",
            description="Prompt-only verdicts read from Task 1 alone (generation stopped before "
            "Task 2: GUARDSTREAM_EARLY_EXIT).",
        )
        counter(
            "guardstream_early_exit_regenerated",
            [self._guard_stat("regenerated")],
            unit="{request}",
            description="Prompt-only requests whose early-exit output could not be read, "
            "generated again in full.",
        )
        gauge(
            "guardstream_batches_in_flight",
            [self._in_flight],
            unit="{batch}",
            description="Model calls being processed by the engine now (per-request "
            "admission: requests decoding; fixed batches: batches).",
        )
        gauge(
            "guardstream_cache_degraded",
            [self._cache_degraded],
            description="1 while the verdict cache is unavailable (breaker not closed), else 0.",
        )
        gauge(
            "guardstream_consumer_lag",
            [self._consumer_lag],
            unit="{message}",
            description="Highwater minus the next offset to read, per assigned input partition.",
        )
        gauge(
            "guardstream_event_loop_lag",
            [lambda _o: [Observation(self.loop_lag_s)]],
            unit="s",
            description="How late the event loop's last heartbeat woke up.",
        )
        self.batch_size = m.create_histogram(
            "guardstream_batch_size",
            unit="{request}",
            description="Distinct requests per model batch (cache misses; hits never join one).",
            explicit_bucket_boundaries_advisory=BATCH_SIZE_BUCKETS,
        )
        self.batch_wait = m.create_histogram(
            "guardstream_batch_wait",
            unit="s",
            description="Time a cache miss (or, without a cache, any request) waited from submit "
            "to the start of its model batch.",
            explicit_bucket_boundaries_advisory=BATCH_WAIT_BUCKETS_S,
        )
        self.generation = m.create_histogram(
            "guardstream_generation_latency",
            unit="s",
            description="Model generation time per batch (batches with cache misses).",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
        )
        self.end_to_end = m.create_histogram(
            "guardstream_end_to_end_latency",
            unit="s",
            description="From the message's created_at (else its Kafka timestamp) to its "
            "verdict's broker acknowledgement.",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
        )

    # --- observations ------------------------------------------------------------------------

    def _cache_stat(self, what: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            cache = self._guard.cache if self._guard is not None else None
            return [Observation(getattr(cache.stats, what))] if cache is not None else []

        return callback

    def _escalations(self, options: CallbackOptions) -> Iterable[Observation]:
        guard = self._guard
        if guard is None or guard.cascade is None:
            return []
        tally: Tally = Counter(guard.stats.escalations)
        return _observe(tally, ["reason", "outcome"])(options)

    def _guard_stat(self, what: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            guard = self._guard
            return [Observation(getattr(guard.stats, what))] if guard is not None else []

        return callback

    def _in_flight(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._guard.batches_in_flight)] if self._guard is not None else []

    def _cache_degraded(self, _options: CallbackOptions) -> Iterable[Observation]:
        cache = self._guard.cache if self._guard is not None else None
        return [Observation(0 if cache.available else 1)] if cache is not None else []

    def _consumer_lag(self, _options: CallbackOptions) -> Iterable[Observation]:
        if self._lag is None:
            return []
        return [
            Observation(lag, {"topic": topic, "partition": partition})
            for (topic, partition), lag in self._lag().items()
        ]

    # --- hooks -------------------------------------------------------------------------------

    def on_batch(self, size: int, waits_ms: Sequence[float], generate_ms: float) -> None:
        """The guard's `on_batch` hook."""
        self.batch_size.record(size)
        record = self.batch_wait.record
        for wait in waits_ms:
            record(wait / 1000)
        if generate_ms > 0:
            self.generation.record(generate_ms / 1000)

    def cache_state(self, state: str) -> None:
        self.cache_changes[(state,)] += 1

    def shutdown(self) -> None:
        self.provider.shutdown(timeout_millis=5000)
