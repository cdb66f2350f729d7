"""Publishing records in partition batches, and re-sending what the broker did not take.

``AIOKafkaProducer.send()`` costs a coroutine per message; at tens of thousands of
predictions a second that is the bottleneck. Here records are grouped per output partition
(Kafka's murmur2 partitioner on the key, as Java clients do, cached per key) into
``BatchBuilder``\\ s, so the broker round trip and the Python overhead are per batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

logger = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


# One record to send: (key, value, headers). A plain tuple because the daemon builds one
# per prediction on its event loop: 40 ns, against 170 ns for a slotted dataclass.
OutRecord = tuple[bytes | None, bytes, Headers]


# Placements remembered per topic (~150 B each); more distinct keys start it afresh.
MAX_CACHED_KEYS = 1 << 21
# Longer keys are placed afresh each time: a dead letter carries any producer's key (up to
# TICKCAST_DLQ_MAX_VALUE_BYTES), and 2M of those could hold gigabytes.
MAX_CACHED_KEY_BYTES = 256


@dataclass
class Delivery:
    """One batch handed to the producer; ``future`` resolves when the broker acks it."""

    topic: str
    partition: int
    records: list[OutRecord]
    future: asyncio.Future[object] = field(repr=False)


@dataclass
class SendProgress:
    """What one :meth:`BatchPublisher.send` call handed to the producer so far, so that a
    retry of the same call hands over only the rest."""

    deliveries: list[Delivery] = field(default_factory=list)
    # The topic's partitions when the send began, and where its deliveries start: if the
    # partitions change between tries, placements change, and the records go again.
    partitions: tuple[int, ...] = ()
    first: int = 0


class BatchPublisher:
    """Sends records to a topic as per-partition batches; keeps them until acknowledged."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._partitioner = DefaultPartitioner()
        self._partition_of: dict[str, dict[bytes | None, int]] = {}  # topic -> key -> p
        self._partition_count: dict[str, int] = {}

    def _partitions(self, topic: str) -> list[int]:
        cluster = self._producer.client.cluster
        partitions = sorted(cluster.partitions_for_topic(topic) or ())
        if not partitions:
            raise KafkaError(f"no metadata for topic {topic!r}")
        if self._partition_count.get(topic) != len(partitions):
            # Partition count changed (or first use): cached placements are stale.
            self._partition_of[topic] = {}
            self._partition_count[topic] = len(partitions)
        return partitions

    def partition_for(self, topic: str, key: bytes | None, partitions: list[int]) -> int:
        placed = self._partition_of.setdefault(topic, {})
        cached = placed.get(key)
        if cached is None:
            cached = self._partitioner(key, partitions, partitions)
            if key is None or len(key) <= MAX_CACHED_KEY_BYTES:
                if len(placed) >= MAX_CACHED_KEYS:
                    # Dead letters carry any producer's keys: keep it bounded. The key-less
                    # placement stays: it is a random pick, and a retried send must place
                    # its records where the failed try did (a hashed key lands there anyway).
                    keyless = placed.get(None)
                    placed.clear()
                    if keyless is not None:
                        placed[None] = keyless
                placed[key] = cached
        return cached

    async def send(
        self, topic: str, records: Sequence[OutRecord], progress: SendProgress | None = None
    ) -> list[Delivery]:
        """Hand records to the producer, in order per partition; returns the deliveries.

        With ``progress``, each delivery is recorded there as it is handed over, and a call
        that repeats a failed one (same records, same progress) skips the records the
        failed call handed over: a retry neither sends them twice nor loses their acks.
        It then returns every delivery of both calls.
        """
        progress = SendProgress() if progress is None else progress
        if not records:
            return progress.deliveries
        await self._producer.client._wait_on_metadata(topic)
        partitions = self._partitions(topic)
        handed_over: dict[int, int] = {}  # records per partition already with the producer
        if progress.partitions != tuple(partitions):
            progress.partitions, progress.first = tuple(partitions), len(progress.deliveries)
        else:
            for delivery in progress.deliveries[progress.first :]:
                n = handed_over.get(delivery.partition, 0)
                handed_over[delivery.partition] = n + len(delivery.records)
        placed = self._partition_of[topic]
        by_partition: dict[int, list[OutRecord]] = {p: [] for p in partitions}
        for record in records:
            p = placed.get(record[0])
            if p is None:
                p = self.partition_for(topic, record[0], partitions)
            by_partition[p].append(record)
        for partition, items in by_partition.items():
            items = items[handed_over.get(partition, 0) :]
            if items:
                await self.send_to_partition(topic, partition, items, progress.deliveries)
        return progress.deliveries

    async def send_to_partition(
        self,
        topic: str,
        partition: int,
        records: list[OutRecord],
        deliveries: list[Delivery] | None = None,
    ) -> list[Delivery]:
        """Send records to one explicit partition, in order; each delivery is appended to
        ``deliveries`` (returned) as soon as it is handed over."""
        deliveries = [] if deliveries is None else deliveries
        batch = self._producer.create_batch()
        members: list[OutRecord] = []
        for record in records:
            key, value, headers = record
            if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                deliveries.append(await self._submit(topic, partition, batch, members))
                batch, members = self._producer.create_batch(), []
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    raise KafkaError(f"record of {len(value)} bytes does not fit an empty batch")
            members.append(record)
        if members:
            deliveries.append(await self._submit(topic, partition, batch, members))
        return deliveries

    async def _submit(
        self, topic: str, partition: int, batch: object, members: list[OutRecord]
    ) -> Delivery:
        future = await self._producer.send_batch(batch, topic, partition=partition)
        return Delivery(topic, partition, members, future)

    async def resend(self, delivery: Delivery, handed: list[Delivery]) -> list[Delivery]:
        """Send a failed delivery's records again (same partition, same order); returns the
        new deliveries (several if the batch size shrank).

        Each new delivery is appended to ``handed`` as it goes to the producer, and a call
        with the same ``handed`` skips the records already in it: a resend that failed
        partway is resumed, not repeated.
        """
        done = sum(len(d.records) for d in handed)
        await self.send_to_partition(
            delivery.topic, delivery.partition, delivery.records[done:], handed
        )
        return handed
