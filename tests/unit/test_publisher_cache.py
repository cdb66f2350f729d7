"""The publisher's key -> partition cache stays bounded (dead letters carry any key), and a
retried send hands over only what the failed try did not."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from aiokafka.errors import KafkaConnectionError
from aiokafka.partitioner import DefaultPartitioner

from daemon import publisher
from daemon.publisher import BatchPublisher, Delivery, OutRecord, SendProgress


def test_placements_match_the_partitioner_and_the_cache_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(publisher, "MAX_CACHED_KEYS", 3)
    batch_publisher = BatchPublisher(SimpleNamespace())
    partitions = [0, 1, 2, 3, 4, 5]
    keys = [f"key-{i}".encode() for i in range(10)]
    placed = [batch_publisher.partition_for("dlq", k, partitions) for k in keys * 2]
    expected = [DefaultPartitioner()(k, partitions, partitions) for k in keys * 2]
    assert placed == expected
    assert len(batch_publisher._partition_of["dlq"]) <= 3


class FakeBatch:
    """Holds up to ``capacity`` records, like a BatchBuilder that fills up."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: list[bytes] = []

    def append(self, *, key: bytes, value: bytes, timestamp: None, headers: object) -> object:
        if len(self.keys) >= self.capacity:
            return None
        self.keys.append(key)
        return object()


class FlakyProducer:
    """A producer whose ``send_batch`` fails once, on the ``fail_at``-th batch handed over."""

    def __init__(self, partitions: list[int], fail_at: int, capacity: int = 2) -> None:
        self.partitions, self.fail_at, self.capacity = partitions, fail_at, capacity
        self.handed: list[tuple[int, list[bytes]]] = []
        self.calls = 0
        self.client = SimpleNamespace(
            _wait_on_metadata=self._metadata,
            cluster=SimpleNamespace(partitions_for_topic=lambda topic: set(self.partitions)),
        )

    async def _metadata(self, topic: str) -> None:
        return None

    def create_batch(self) -> FakeBatch:
        return FakeBatch(self.capacity)

    async def send_batch(self, batch: FakeBatch, topic: str, partition: int) -> object:
        self.calls += 1
        if self.calls == self.fail_at:
            raise KafkaConnectionError("accumulator full")
        self.handed.append((partition, list(batch.keys)))
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def records(n: int) -> list[OutRecord]:
    return [(f"key-{i}".encode(), b"v", []) for i in range(n)]


def keys_of(deliveries: list[Delivery]) -> list[bytes]:
    return [r[0] or b"" for d in deliveries for r in d.records]


def per_partition(handed: list[tuple[int, list[bytes]]]) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    for partition, keys in handed:
        out.setdefault(partition, []).extend(keys)
    return out


async def test_a_retried_send_hands_over_only_what_the_failed_try_did_not() -> None:
    """A send that fails after some batches went to the producer: the retry with the same
    progress sends the rest, once, and returns every delivery of both tries."""
    sent = records(12)
    reference = FlakyProducer([0, 1, 2], fail_at=0)
    await BatchPublisher(reference).send("t", sent)
    expected = per_partition(reference.handed)
    assert len(reference.handed) > 3, "several batches, so the failure falls mid-send"

    producer = FlakyProducer([0, 1, 2], fail_at=3)
    batch_publisher = BatchPublisher(producer)
    progress = SendProgress()
    with pytest.raises(KafkaConnectionError):
        await batch_publisher.send("t", sent, progress)
    assert len(progress.deliveries) == 2  # handed over before the failure, acks kept
    deliveries = await batch_publisher.send("t", sent, progress)
    assert per_partition(producer.handed) == expected  # every record once, in order
    assert len(deliveries) == len(reference.handed)
    assert sorted(keys_of(deliveries)) == sorted(r[0] or b"" for r in sent)


async def test_a_retry_after_the_partitions_changed_sends_everything_again() -> None:
    sent = records(12)
    producer = FlakyProducer([0, 1, 2], fail_at=3)
    batch_publisher = BatchPublisher(producer)
    progress = SendProgress()
    with pytest.raises(KafkaConnectionError):
        await batch_publisher.send("t", sent, progress)
    producer.partitions = [0, 1, 2, 3]  # placements change: no way to tell what is left
    deliveries = await batch_publisher.send("t", sent, progress)
    assert sorted(keys_of(deliveries[2:])) == sorted(r[0] or b"" for r in sent)
    assert len(deliveries) > 2  # the first try's deliveries are still awaited
