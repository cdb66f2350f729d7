"""A fake producer for the publisher's unit tests: batches that fill up, and a
``send_batch`` that fails once, so a send can be cut off partway."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from aiokafka.errors import KafkaConnectionError


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


def per_partition(handed: list[tuple[int, list[bytes]]]) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    for partition, keys in handed:
        out.setdefault(partition, []).extend(keys)
    return out
