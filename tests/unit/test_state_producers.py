"""The fenced state writers: one transactional producer per state partition held.

Fake producers follow aiokafka's transaction states (a stopped producer's abort never
returns, a fenced one refuses to begin); the fencing itself (InitProducerId aborting a
previous owner's open write) runs on the real broker in tests/integration/test_state_topic.py.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from aiokafka.errors import KafkaError, ProducerFenced

from daemon.state_store import (
    MARKER_KEY,
    FencedStateProducers,
    PartitionNotHeldError,
    StateWriter,
)
from daemon.windows import SymbolWindows

Log = list[tuple[str, int]]


class FakeBatch:
    def __init__(self) -> None:
        self.keys: list[bytes | None] = []

    def append(self, *, key: bytes | None, value: bytes, timestamp: None, headers: list) -> object:
        self.keys.append(key)
        return object()


class FakeProducer:
    """Records calls; ``hang_start``/``hang_sends`` never finish, ``fenced`` refuses."""

    def __init__(self, partition: int, log: Log, *, hang_start: bool = False) -> None:
        self.partition = partition
        self.log = log
        self.hang_start = hang_start
        self.hang_sends = False
        self.fenced = False
        self.fail_commit = False
        self._closed = False
        self.sent: list[bytes | None] = []

    async def start(self) -> None:
        if self.hang_start:
            await asyncio.Event().wait()  # no transaction coordinator answers
        self.log.append(("start", self.partition))

    async def stop(self) -> None:
        self._closed = True
        self.log.append(("stop", self.partition))

    async def begin_transaction(self) -> None:
        if self.fenced:
            raise AssertionError("Invalid state transition FATAL_ERROR -> IN_TRANSACTION")
        self.log.append(("begin", self.partition))

    async def commit_transaction(self) -> None:
        if self.fail_commit:
            raise ProducerFenced()
        self.log.append(("commit", self.partition))

    async def abort_transaction(self) -> None:
        if self._closed:
            await asyncio.Event().wait()  # aiokafka: the sender that would end it is gone
        self.log.append(("abort", self.partition))

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> asyncio.Future:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self.hang_sends:
            self.sent += batch.keys
            done.set_result(None)
        return done


class Fleet:
    """The producers made so far, by partition."""

    def __init__(self, hang_start: frozenset[int] = frozenset()) -> None:
        self.log: Log = []
        self.made: dict[int, FakeProducer] = {}
        self.hang_start = hang_start

    def make(self, partition: int) -> FakeProducer:
        producer = FakeProducer(partition, self.log, hang_start=partition in self.hang_start)
        self.made[partition] = producer
        return producer


def fenced_producers(fleet: Fleet, **timeouts: float) -> FencedStateProducers:
    return FencedStateProducers(fleet.make, **timeouts)


async def test_acquiring_starts_one_writer_per_partition_once() -> None:
    fleet = Fleet()
    producers = fenced_producers(fleet)
    await producers.acquire([2, 0, 2])
    assert sorted(fleet.log) == [("start", 0), ("start", 2)]
    await producers.acquire([0])
    assert len(fleet.log) == 2, "a partition already held keeps its writer"
    producers.publisher(0)
    with pytest.raises(PartitionNotHeldError):
        producers.publisher(1)


async def test_a_round_is_one_transaction_per_held_partition() -> None:
    fleet = Fleet()
    producers = fenced_producers(fleet)
    await producers.acquire([0, 1])
    fleet.log.clear()
    async with producers.transactions([1, 0, 1, 7]) as writable:
        assert writable == {0, 1}, "partition 7 is not held here: left out"
    assert fleet.log == [("begin", 0), ("begin", 1), ("commit", 0), ("commit", 1)]
    fleet.log.clear()
    with pytest.raises(RuntimeError):
        async with producers.transactions([0, 1]):
            raise RuntimeError("a send failed")
    assert fleet.log == [("begin", 0), ("begin", 1), ("abort", 0), ("abort", 1)]


async def test_a_fenced_writer_is_dropped_and_the_round_goes_on_without_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fleet = Fleet()
    producers = fenced_producers(fleet)
    await producers.acquire([0, 1])
    fleet.made[1].fenced = True  # a newer owner initialised partition 1's id
    async with producers.transactions([0, 1]) as writable:
        assert writable == {0}
    assert ("stop", 1) in fleet.log
    assert "state partition 1: its writer failed" in caplog.text
    with pytest.raises(PartitionNotHeldError):
        producers.publisher(1)


async def test_a_failed_commit_aborts_only_that_partition() -> None:
    fleet = Fleet()
    producers = fenced_producers(fleet)
    await producers.acquire([0, 1])
    fleet.made[0].fail_commit = True
    fleet.log.clear()
    with pytest.raises(ProducerFenced):
        async with producers.transactions([0, 1]):
            pass
    assert ("commit", 1) in fleet.log and ("abort", 0) in fleet.log
    assert ("abort", 1) not in fleet.log, "partition 1's commit stands"


async def test_a_round_whose_writer_was_released_ends_without_waiting_for_its_abort() -> None:
    """The revocation's drain timed out: the partition's writer is stopped under a round
    still open on it. aiokafka's abort would wait for good for the stopped sender."""
    fleet = Fleet()
    producers = fenced_producers(fleet, abort_timeout_s=60)  # not what ends it
    await producers.acquire([0, 1])

    async def round_cut_short() -> None:
        async with producers.transactions([0, 1]):
            await producers.release([0], timeout_s=1.0)
            raise KafkaError("ProducerClosed")

    with pytest.raises(KafkaError):
        await asyncio.wait_for(round_cut_short(), timeout=5)
    assert ("abort", 1) in fleet.log and ("abort", 0) not in fleet.log


async def test_a_writer_that_does_not_start_says_how_to_run_unfenced() -> None:
    fleet = Fleet(hang_start=frozenset({1}))
    producers = fenced_producers(fleet, start_timeout_s=0.2)
    with pytest.raises(KafkaError, match="TICKCAST_STATE_FENCING=false"):
        await asyncio.wait_for(producers.acquire([0, 1]), timeout=5)
    assert ("stop", 1) in fleet.log, "the half-started producer is closed"
    with pytest.raises(PartitionNotHeldError):
        producers.publisher(1)


def changed_windows() -> SymbolWindows:
    """Two symbols on partition 0, one on partition 1 (synthetic prices: only which
    records go where matters here)."""
    windows = SymbolWindows(window_length=3)
    slots = windows.slots_for(["A", "B", "C"], np.array([0, 0, 1], np.int32), np.arange(3))
    windows.apply(slots, np.array([1.0, 2.0, 3.0]), np.ones(3, np.int64))
    return windows


async def test_the_writer_leaves_out_a_fenced_partition_and_writes_the_rest() -> None:
    fleet = Fleet()
    producers = fenced_producers(fleet)
    await producers.acquire([0, 1])
    fleet.made[1].fenced = True
    windows = changed_windows()
    writer = StateWriter(producers, "ticks.state", windows)
    pending = writer.take({0: 3, 1: 3})
    assert pending is not None
    writer.submit(pending)
    running = asyncio.create_task(writer.run())
    await asyncio.wait_for(writer.wait_idle(), timeout=5)
    running.cancel()
    assert fleet.made[0].sent == [b"A", b"B", MARKER_KEY]
    assert fleet.made[1].sent == [], "partition 1's state stays as its last owner left it"
    assert pending.written


async def test_an_abandoned_round_is_given_up_and_the_writer_goes_on() -> None:
    fleet = Fleet()
    producers = fenced_producers(fleet)
    await producers.acquire([0, 1])
    fleet.made[0].hang_sends = True  # the broker stopped answering
    windows = changed_windows()
    writer = StateWriter(producers, "ticks.state", windows)
    running = asyncio.create_task(writer.run())
    stuck = writer.take({0: 3, 1: 3})
    assert stuck is not None
    writer.submit(stuck)
    await asyncio.sleep(0.05)
    assert not stuck.settled

    writer.abandon_current()  # what a revocation whose drain timed out does
    await asyncio.wait_for(writer.wait_idle(), timeout=5)
    assert stuck.settled and not stuck.written
    assert ("abort", 0) in fleet.log and ("abort", 1) in fleet.log
    assert not running.done(), "the writer itself keeps running"

    fleet.made[0].hang_sends = False
    again = writer.take({0: 3, 1: 3})
    assert again is not None and sorted(again.snapshot.symbols) == ["A", "B", "C"]
    writer.submit(again)
    await asyncio.wait_for(writer.wait_idle(), timeout=5)
    assert again.written
    running.cancel()
