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
from tests.support.producers import FlakyProducer, per_partition


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


def test_the_keyless_placement_survives_the_cache_being_cleared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Key-less records go to a random partition; a retried send relies on finding them
    # where the failed try put them, however many keys were placed in between.
    monkeypatch.setattr(publisher, "MAX_CACHED_KEYS", 3)
    batch_publisher = BatchPublisher(SimpleNamespace())
    partitions = list(range(64))
    keyless = batch_publisher.partition_for("dlq", None, partitions)
    for i in range(20):
        batch_publisher.partition_for("dlq", f"key-{i}".encode(), partitions)
        assert batch_publisher.partition_for("dlq", None, partitions) == keyless
    assert len(batch_publisher._partition_of["dlq"]) <= 3


def test_long_keys_are_placed_right_but_never_cached() -> None:
    """A producer's 256 KiB keys on 4,000 bad ticks once held ~1 GiB in the cache."""
    batch_publisher = BatchPublisher(SimpleNamespace())
    partitions = [0, 1, 2]
    long_keys = [bytes([i]) * (publisher.MAX_CACHED_KEY_BYTES + 1) for i in range(50)]
    short = b"x" * publisher.MAX_CACHED_KEY_BYTES
    for key in [*long_keys, short]:
        assert batch_publisher.partition_for("dlq", key, partitions) == DefaultPartitioner()(
            key, partitions, partitions
        )
    assert list(batch_publisher._partition_of["dlq"]) == [short]


def records(n: int) -> list[OutRecord]:
    return [(f"key-{i}".encode(), b"v", []) for i in range(n)]


def keys_of(deliveries: list[Delivery]) -> list[bytes]:
    return [r[0] or b"" for d in deliveries for r in d.records]


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


def failed_delivery(partition: int, sent: list[OutRecord]) -> Delivery:
    future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    future.set_exception(KafkaConnectionError("broker gone"))
    future.exception()  # retrieved: the test is about the resend, not this future
    return Delivery("t", partition, sent, future)


async def test_a_resend_cut_off_partway_is_resumed_not_repeated() -> None:
    """A failed delivery of 5 records, resent in batches of 2: the second batch is refused;
    calling again with the same list hands over only the last 3 records."""
    sent = records(5)
    producer = FlakyProducer([0, 1], fail_at=2)
    batch_publisher = BatchPublisher(producer)
    failed = failed_delivery(1, sent)
    handed: list[Delivery] = []
    with pytest.raises(KafkaConnectionError):
        await batch_publisher.resend(failed, handed)
    assert keys_of(handed) == [b"key-0", b"key-1"]
    again = await batch_publisher.resend(failed, handed)
    assert again is handed and keys_of(again) == [r[0] for r in sent]
    assert per_partition(producer.handed) == {1: [r[0] for r in sent]}  # each record once
