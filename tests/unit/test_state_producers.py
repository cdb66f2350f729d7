"""The fenced state writers: one transactional producer per state partition held.

A fake producer records the calls; the fencing itself (InitProducerId aborting a previous
owner's open write) is exercised on the real broker in
tests/integration/test_state_topic.py."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
from aiokafka.errors import KafkaConnectionError, KafkaError

from daemon.state_store import FencedStateProducers, PartitionNotHeldError


class FakeProducer:
    def __init__(self, partition: int, log: list[tuple[str, int]], fail_start: bool) -> None:
        self.partition = partition
        self.log = log
        self.fail_start = fail_start

    async def start(self) -> None:
        if self.fail_start:
            raise KafkaConnectionError("no transaction coordinator")
        self.log.append(("start", self.partition))

    async def stop(self) -> None:
        self.log.append(("stop", self.partition))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        self.log.append(("begin", self.partition))
        try:
            yield
        except BaseException:
            self.log.append(("abort", self.partition))
            raise
        self.log.append(("commit", self.partition))


def producers(fail_start: frozenset[int] = frozenset()) -> tuple[FencedStateProducers, list]:
    log: list[tuple[str, int]] = []
    made = FencedStateProducers(lambda p: FakeProducer(p, log, p in fail_start))
    return made, log


async def test_acquiring_starts_each_partitions_writer_with_an_empty_transaction() -> None:
    fenced, log = producers()
    await fenced.acquire([2, 0, 2])
    # The empty transaction is what waits for InitProducerId (the fence) to complete.
    assert sorted(log) == sorted(
        [("start", 0), ("begin", 0), ("commit", 0), ("start", 2), ("begin", 2), ("commit", 2)]
    )
    log.clear()
    await fenced.acquire([0])
    assert log == [], "a partition already held keeps its writer"
    fenced.publisher(0)
    with pytest.raises(PartitionNotHeldError):
        fenced.publisher(1)


async def test_a_round_is_one_transaction_per_partition_aborted_together() -> None:
    fenced, log = producers()
    await fenced.acquire([0, 1])
    log.clear()
    async with fenced.transactions([1, 0, 1]):
        pass
    assert log == [("begin", 0), ("begin", 1), ("commit", 1), ("commit", 0)]
    log.clear()
    with pytest.raises(RuntimeError):
        async with fenced.transactions([0, 1]):
            raise RuntimeError("a send failed")
    assert log == [("begin", 0), ("begin", 1), ("abort", 1), ("abort", 0)]


async def test_a_round_on_a_partition_not_held_fails_before_it_writes() -> None:
    fenced, log = producers()
    await fenced.acquire([0])
    log.clear()
    with pytest.raises(PartitionNotHeldError):
        async with fenced.transactions([0, 1]):
            pytest.fail("nothing may be written")
    assert log == [("begin", 0), ("abort", 0)]


async def test_releasing_stops_the_writers_and_forgets_them() -> None:
    fenced, log = producers()
    await fenced.acquire([0, 1])
    log.clear()
    await fenced.release([1, 5], timeout_s=1.0)
    assert log == [("stop", 1)]
    with pytest.raises(PartitionNotHeldError):
        fenced.publisher(1)
    await fenced.stop(timeout_s=1.0)
    assert log == [("stop", 1), ("stop", 0)]


async def test_a_writer_that_cannot_start_says_how_to_run_unfenced() -> None:
    fenced, log = producers(fail_start=frozenset({1}))
    with pytest.raises(KafkaError, match="TICKCAST_STATE_FENCING=false"):
        await fenced.acquire([1])
    assert log == [("stop", 1)], "the half-started producer is closed"
    with pytest.raises(PartitionNotHeldError):
        fenced.publisher(1)
