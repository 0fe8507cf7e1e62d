"""Only events the worker processed are ever committed.

Faust's stream skips an event that it takes off an agent's queue while a rebalance is under way
or that was fetched in an earlier consumer generation ("Skipping message ... because app
generation_id is ..." in `faust.streams`), and acks it so that lag does not grow
(faust-streaming 0.15). Such an event was never processed: acking it lets Faust commit past it,
and a worker whose agent was slow to drain its queue when a rebalance began (a busy model, a
response waiting for its prompt) committed past events it never published, also for
partitions that had moved to another worker meanwhile: those events were lost.

`AckGuard` wraps the consumer's `ack`: an event that the processor did not take (`take`) is
marked acked (so that Faust's wait for in-flight events at a rebalance or shutdown does not wait
for it) without its offset being recorded, so it is never committed and is read again by
whoever owns its partition.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

log = logging.getLogger("guardstream.acks")


class AckGuard:
    def __init__(self) -> None:
        self._taken: weakref.WeakSet[Any] = weakref.WeakSet()
        self.refused = 0  # acks of events never processed, not recorded

    def take(self, message: Any) -> None:
        """The processor has taken this message (its ack, later, is a real one)."""
        self._taken.add(message)

    def install(self, consumer: Any) -> None:
        """Wrap `consumer.ack` (Faust's `Consumer.ack(message) -> bool`)."""
        real: Callable[[Any], bool] = consumer.ack
        taken = self._taken

        def ack(message: Any) -> bool:
            if message in taken:
                return real(message)
            message.acked = True
            self.refused += 1
            if self.refused == 1 or not self.refused % 1000:
                log.info(
                    "%d events skipped by Faust at a rebalance left uncommitted (read again)",
                    self.refused,
                )
            return False

        consumer.ack = ack
