"""The publisher's key -> partition cache stays bounded: dead letters carry any key."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from aiokafka.partitioner import DefaultPartitioner

from daemon import publisher
from daemon.publisher import BatchPublisher


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
