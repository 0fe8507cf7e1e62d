"""Consumer lag per assigned input partition: highwater minus the next offset to read.

The highwater is what the consumer last heard from the broker (aiokafka's `highwater(tp)`,
through Faust's consumer; the last stable offset under exactly_once). The next offset to read is
one past the last offset Faust handed to the agents (its monitor's read offsets), or, before it
read anything from a partition, the consumer's position there (an async call, made only then).
`refresh()` runs on a timer; the metric reads the last result.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any

log = logging.getLogger("guardstream.telemetry")


class LagTracker:
    def __init__(self, app: Any, topics: Collection[str]) -> None:
        self._app = app
        self._topics = frozenset(topics)
        self.lag: dict[tuple[str, int], int] = {}

    def current(self) -> Mapping[tuple[str, int], int]:
        return self.lag

    async def refresh(self) -> None:
        try:
            self.lag = await self._measure()
        except Exception as exc:  # noqa: BLE001 - the consumer may be (re)starting
            log.debug("consumer lag not measured: %r", exc)
            self.lag = {}

    async def _measure(self) -> dict[tuple[str, int], int]:
        consumer = self._app.consumer
        read = self._app.monitor.tp_read_offsets
        out: dict[tuple[str, int], int] = {}
        for tp in consumer.assignment():
            if tp.topic not in self._topics:
                continue
            highwater = consumer.highwater(tp)
            if highwater is None or highwater < 0:
                continue
            last_read = read.get(tp)
            position = last_read + 1 if last_read is not None else await consumer.position(tp)
            if position is None:
                continue
            out[(tp.topic, tp.partition)] = max(0, highwater - position)
        return out
