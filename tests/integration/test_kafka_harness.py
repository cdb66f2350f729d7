"""The test broker behaves like Kafka: keyed partitioning, acks=all, group commits, restarts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import NamedTuple

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from daemon.embedded_kafka import KafkaBroker

pytestmark = pytest.mark.kafka

RECEIVE_TIMEOUT_S = 30.0


class Record(NamedTuple):
    partition: int
    offset: int
    key: bytes
    value: bytes


async def produce(producer: AIOKafkaProducer, topic: str, start: int, count: int) -> list[Record]:
    """Send ``count`` keyed records numbered from ``start``; return where each landed."""
    records = []
    for number in range(start, start + count):
        key = f"sym-{number % 7}".encode()
        value = f"tick-{number}".encode()
        metadata = await producer.send_and_wait(topic, value=value, key=key)
        records.append(Record(metadata.partition, metadata.offset, key, value))
    return records


async def receive(consumer: AIOKafkaConsumer, count: int) -> list[Record]:
    """Exactly the next ``count`` records, failing if fewer arrive in time."""
    received: list[Record] = []
    async with asyncio.timeout(RECEIVE_TIMEOUT_S):
        while len(received) < count:
            batches = await consumer.getmany(timeout_ms=500)
            for messages in batches.values():
                received.extend(Record(m.partition, m.offset, m.key, m.value) for m in messages)
    return received


async def assert_nothing_more(consumer: AIOKafkaConsumer, wait_s: float = 1.5) -> None:
    batches = await consumer.getmany(timeout_ms=int(wait_s * 1000))
    extra = [m.offset for messages in batches.values() for m in messages]
    assert extra == [], f"unexpected extra records at offsets {extra}"


@asynccontextmanager
async def started_producer(bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


@asynccontextmanager
async def started_consumer(
    bootstrap: str, topic: str, group: str
) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


def by_position(records: Sequence[Record]) -> list[Record]:
    return sorted(records, key=lambda r: (r.partition, r.offset))


async def test_group_resumes_exactly_after_committed_offsets(
    kafka_bootstrap: str, topic_factory: Callable[..., Awaitable[str]], unique_group: str
) -> None:
    topic = await topic_factory(partitions=3)
    async with started_producer(kafka_bootstrap) as producer:
        first = await produce(producer, topic, start=0, count=60)

    partitions = {r.partition for r in first}
    assert partitions == {0, 1, 2}, "7 keys over 3 partitions should use all of them"
    for key in {r.key for r in first}:
        assert len({r.partition for r in first if r.key == key}) == 1, f"{key!r} was split"

    async with started_consumer(kafka_bootstrap, topic, unique_group) as consumer:
        received = await receive(consumer, len(first))
        await assert_nothing_more(consumer)
        assert by_position(received) == by_position(first)
        for partition in partitions:
            offsets = [r.offset for r in received if r.partition == partition]
            assert offsets == sorted(offsets), f"partition {partition} arrived out of order"

        # Commit only part of each partition: the next member must resume exactly there,
        # neither from the start (re-reads) nor from the end (missed records).
        commit_at = {}
        for partition in partitions:
            offsets = sorted(r.offset for r in first if r.partition == partition)
            commit_at[partition] = offsets[len(offsets) // 2]
        await consumer.commit({TopicPartition(topic, p): o for p, o in commit_at.items()})
        for partition, offset in commit_at.items():
            assert await consumer.committed(TopicPartition(topic, partition)) == offset

    async with started_producer(kafka_bootstrap) as producer:
        second = await produce(producer, topic, start=len(first), count=30)

    expected = [r for r in first if r.offset >= commit_at[r.partition]] + second
    async with started_consumer(kafka_bootstrap, topic, unique_group) as consumer:
        resumed = await receive(consumer, len(expected))
        await assert_nothing_more(consumer)
    assert by_position(resumed) == by_position(expected)


async def test_broker_restart_keeps_records_and_commits(
    kafka_broker: KafkaBroker, topic_factory: Callable[..., Awaitable[str]], unique_group: str
) -> None:
    bootstrap = kafka_broker.bootstrap
    topic = await topic_factory(partitions=2)

    # This producer lives through the restart, like the daemon's would.
    async with started_producer(bootstrap) as producer:
        before = await produce(producer, topic, start=0, count=20)
        async with started_consumer(bootstrap, topic, unique_group) as consumer:
            assert by_position(await receive(consumer, len(before))) == by_position(before)
            await consumer.commit()

        await asyncio.to_thread(kafka_broker.restart)
        assert kafka_broker.is_running
        assert kafka_broker.bootstrap == bootstrap

        after = await produce(producer, topic, start=len(before), count=20)

    # The committed group resumes after the restart point...
    async with started_consumer(bootstrap, topic, unique_group) as consumer:
        assert by_position(await receive(consumer, len(after))) == by_position(after)
        await assert_nothing_more(consumer)

    # ...and a new group still finds every record written before the restart.
    async with started_consumer(bootstrap, topic, f"{unique_group}-fresh") as consumer:
        everything = await receive(consumer, len(before) + len(after))
    assert by_position(everything) == by_position(before + after)
