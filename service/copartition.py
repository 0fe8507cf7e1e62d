"""Co-partitioning, checked: is each input message in the partition its conversation id hashes to?

Pairing a response with its prompt across workers needs both in the same partition number of
their topics: the same key (the conversation id), the same partition count and the same
partitioner. Kafka's Java client, aiokafka and kafkajs hash keys with murmur2; librdkafka's
clients (confluent-kafka, and the Go, .NET and C clients on it) default to CRC32
(`consistent_random`) unless `partitioner=murmur2_random` is set. A message that is not where
murmur2 puts its conversation id is counted (metric `guardstream_misrouted`, by topic and by the
partitioner it matches) and warned about, at most once a minute per topic.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import Counter
from collections.abc import Callable
from functools import lru_cache

from aiokafka.partitioner import murmur2

log = logging.getLogger("guardstream.copartition")

WARN_EVERY_S = 60.0


@lru_cache(maxsize=65_536)
def java_partition(key: bytes, partitions: int) -> int:
    """Where the Java client (and aiokafka, kafkajs) puts `key`: murmur2, positive, modulo."""
    return (int(murmur2(key)) & 0x7FFFFFFF) % partitions


@lru_cache(maxsize=65_536)
def librdkafka_partition(key: bytes, partitions: int) -> int:
    """Where librdkafka's default partitioner (`consistent_random`) puts `key`: CRC32 modulo."""
    return zlib.crc32(key) % partitions


class PartitionCheck:
    """Counts and warns about input messages outside their conversation's murmur2 partition."""

    def __init__(
        self,
        partitions: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        warn_every_s: float = WARN_EVERY_S,
    ) -> None:
        self.partitions = partitions
        self.misrouted: Counter[tuple[str, ...]] = Counter()  # (topic, partitioner)
        self._clock = clock
        self._warn_every_s = warn_every_s
        self._warned: dict[str, float] = {}
        self._since_warning: Counter[str] = Counter()

    def expected(self, conversation_id: str) -> int:
        """The partition murmur2 (Kafka's default) puts the conversation id in."""
        return java_partition(conversation_id.encode(), self.partitions)

    def check(self, topic: str, partition: int, conversation_id: str) -> bool:
        """True when the message is where murmur2 puts its conversation id."""
        key = conversation_id.encode()
        expected = java_partition(key, self.partitions)
        if partition == expected:
            return True
        kind = (
            "crc32"
            if partition == librdkafka_partition(key, self.partitions)
            else "other"
        )
        self.misrouted[(topic, kind)] += 1
        self._since_warning[topic] += 1
        now = self._clock()
        last = self._warned.get(topic)
        if last is None or now - last >= self._warn_every_s:
            self._warned[topic] = now
            n, self._since_warning[topic] = self._since_warning[topic], 0
            hint = (
                "librdkafka's default partitioner (CRC32): set partitioner=murmur2_random"
                if kind == "crc32"
                else "a custom partitioner, another key, or another partition count"
            )
            log.warning(
                "%d message(s) on %s not in the partition their conversation id hashes to "
                "(e.g. partition %d, murmur2 says %d): the producer uses %s. Responses paired "
                "by reply_to across workers need prompts and responses keyed by conversation "
                "id with the same partitioner (murmur2, Kafka's Java default)",
                n,
                topic,
                partition,
                expected,
                hint,
                extra={"topic": topic, "partitioner": kind},
            )
        return False
