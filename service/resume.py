"""Input partitions are read again only once the rebalance is over and they were seeked.

At the end of a rebalance Faust's recovery (faust-streaming 0.15, `Recovery._resume_streams`)
resumes the input partitions and only then, in a later step, seeks them to their committed
offsets, while the fetcher is already running (it was started to read the changelogs). Records it
fetches in between reach Faust's topic conductor while the app is still rebalancing and are
dropped there, and the seek that follows sets the partition's read offset back to the committed
one: the next record fetched, one beyond those dropped, then looks like it follows a gap in the
log (a compacted or transaction-marker gap) and Faust counts the dropped offsets as acked. Its
next commit went past events that no agent ever saw, and the same events fetched again after the
seek were dropped as already read. Seen as runs of 37-471 events of 3,000 never moderated after a
graceful restart, and as losses after a SIGKILL and in group failovers (the trace: records
362-449 of a partition fetched during the seek, a "gap" 363-449 added the moment it ended).

`ResumeGuard` holds back the resumption of the input topics' partitions while a rebalance is
under way (from its start until Faust calls `on_rebalance_end`, after the seek), and resumes
them then: the first record read of each is the one at its committed offset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("guardstream.resume")


class ResumeGuard:
    def __init__(self, topics: Iterable[str]) -> None:
        self._topics = frozenset(topics)
        self._rebalancing = True  # a worker's first assignment is a rebalance too
        self._held: set[Any] = set()
        self._resume: Callable[[Iterable[Any]], None] | None = None
        self._consumer: Any = None
        self.held_back = 0  # resumptions held back until the end of a rebalance

    def install(self, consumer: Any) -> None:
        """Wrap `consumer.resume_partitions` (Faust's `Consumer.resume_partitions(tps)`)."""
        real: Callable[[Iterable[Any]], None] = consumer.resume_partitions
        self._resume = real
        self._consumer = consumer

        def resume_partitions(tps: Iterable[Any]) -> None:
            tps = set(tps)
            if self._rebalancing:
                inputs = {tp for tp in tps if tp.topic in self._topics}
                if inputs:
                    self._held |= inputs
                    self.held_back += 1
                    tps -= inputs
            real(tps)

        consumer.resume_partitions = resume_partitions

    def on_rebalance_start(self) -> None:
        self._rebalancing = True
        self._held.clear()

    def on_rebalance_end(self) -> None:
        """The seek is done: resume the input partitions held back (those still assigned)."""
        self._rebalancing = False
        held, self._held = self._held, set()
        if held and self._resume is not None:
            assigned = set(self._consumer.assignment())
            held = {tp for tp in held if tp in assigned}
            self._resume(held)
            log.debug("resumed %d input partitions after the rebalance", len(held))
