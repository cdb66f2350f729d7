"""The fenced state writers: one transactional producer per state partition held.

Fake producers follow aiokafka's transaction states (a stopped producer's abort never
returns, a fenced one refuses to begin); the fencing itself (InitProducerId aborting a
previous owner's open write) runs on the real broker in tests/integration/test_state_topic.py.
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
from aiokafka.errors import KafkaError, ProducerFenced, TransactionalIdAuthorizationFailed

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
    """aiokafka's transactional producer as far as the writers use it: the same states and
    refused transitions (AssertionError); a commit or abort first waits for the batches
    sent in the transaction (they never expire), goes on when its caller stops waiting
    (aiokafka shields it), and never ends once the producer is stopped (its sender is
    gone)."""

    def __init__(
        self, partition: int, log: Log, *, hang_start: bool = False, fail_start: bool = False
    ) -> None:
        self.partition = partition
        self.log = log
        self.hang_start = hang_start
        self.fail_start = fail_start
        self.hang_sends = False  # the broker stopped answering produce requests
        self.pending: list[asyncio.Future[None]] = []
        self.fenced = False  # a newer owner initialised this transactional id
        self.commit_s = 0.0
        self.state = "READY"
        self.stopped = False
        self.sent: list[bytes | None] = []

    async def start(self) -> None:
        if self.fail_start:
            raise TransactionalIdAuthorizationFailed()
        if self.hang_start:
            await asyncio.Event().wait()  # no transaction coordinator answers
        self.log.append(("start", self.partition))

    async def stop(self) -> None:
        self.stopped = True
        self.log.append(("stop", self.partition))

    def deliver(self) -> None:
        """The broker answers again: the batches held up are acknowledged."""
        self.hang_sends = False
        for future in self.pending:
            if not future.done():
                future.set_result(None)

    def _to(self, target: str, *sources: str) -> None:
        assert self.state in sources, f"Invalid state transition {self.state} -> {target}"
        self.state = target

    async def begin_transaction(self) -> None:
        await asyncio.sleep(0)  # aiokafka waits for the producer id first
        self._to("IN_TRANSACTION", "READY")
        self.log.append(("begin", self.partition))

    async def _end(self, what: str, seconds: float) -> None:
        if self.stopped:
            await asyncio.Event().wait()
        if self.pending:
            await asyncio.wait(self.pending)
        await asyncio.sleep(seconds)
        self.pending = []
        if self.fenced:
            self.state = "FATAL"
            raise ProducerFenced()
        self.state = "READY"
        self.log.append((what, self.partition))

    async def commit_transaction(self) -> None:
        self._to("COMMITTING", "IN_TRANSACTION")
        await asyncio.shield(asyncio.ensure_future(self._end("commit", self.commit_s)))

    async def abort_transaction(self) -> None:
        self._to("ABORTING", "IN_TRANSACTION")
        await asyncio.shield(asyncio.ensure_future(self._end("abort", 0.0)))

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> asyncio.Future:
        assert self.state == "IN_TRANSACTION", "aiokafka sends only inside a transaction"
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append(done)
        if not self.hang_sends:
            self.sent += batch.keys
            done.set_result(None)
        return done


class Fleet:
    """The producers made so far, by partition."""

    def __init__(
        self, hang_start: frozenset[int] = frozenset(), fail_start: frozenset[int] = frozenset()
    ) -> None:
        self.log: Log = []
        self.made: dict[int, FakeProducer] = {}
        self.hang_start = hang_start
        self.fail_start = fail_start
        self.dropped = 0  # writers counted as dropped (on_drop)

    def drop(self) -> None:
        self.dropped += 1

    def make(self, partition: int) -> FakeProducer:
        producer = FakeProducer(
            partition,
            self.log,
            hang_start=partition in self.hang_start,
            fail_start=partition in self.fail_start,
        )
        self.made[partition] = producer
        return producer


def fenced_producers(
    fleet: Fleet, *, start_timeout_s: float = 30.0, end_timeout_s: float = 5.0
) -> FencedStateProducers:
    return FencedStateProducers(
        fleet.make,
        on_drop=fleet.drop,
        start_timeout_s=start_timeout_s,
        end_timeout_s=end_timeout_s,
    )


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
    fleet.made[1].state = "FATAL"  # an earlier round found it fenced by a newer owner
    async with producers.transactions([0, 1]) as writable:
        assert writable == {0}
    assert ("stop", 1) in fleet.log and fleet.dropped == 1
    assert "state partition 1: its writer failed" in caplog.text
    with pytest.raises(PartitionNotHeldError):
        producers.publisher(1)


async def test_a_fenced_commit_drops_that_writer_and_the_others_stand() -> None:
    fleet = Fleet()
    producers = fenced_producers(fleet)
    await producers.acquire([0, 1])
    fleet.made[0].fenced = True  # found out by the broker at the commit
    fleet.log.clear()
    with pytest.raises(ProducerFenced):
        async with producers.transactions([0, 1]):
            pass
    assert ("commit", 1) in fleet.log, "partition 1's commit stands"
    assert not any(what == "abort" for what, _ in fleet.log), "nothing left to abort"
    assert ("stop", 0) in fleet.log and fleet.dropped == 1
    async with producers.transactions([0, 1]) as writable:
        assert writable == {1}, "the fenced writer is not started again"


async def test_a_round_cancelled_during_its_commits_leaves_its_writers_usable() -> None:
    """aiokafka goes on committing when the caller is cancelled (shutdown cancels the
    writer, here twice): the next round waits for those commits before it begins, so no
    healthy writer is refused or dropped."""
    fleet = Fleet()
    producers = fenced_producers(fleet)
    await producers.acquire([0, 1])
    for producer in fleet.made.values():
        producer.commit_s = 0.2
    entered = asyncio.Event()

    async def one_round() -> None:
        async with producers.transactions([0, 1]):
            entered.set()

    task = asyncio.create_task(one_round())
    await entered.wait()
    await asyncio.sleep(0.05)  # the commits are under way
    task.cancel()
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert {p.state for p in fleet.made.values()} == {"COMMITTING"}
    async with producers.transactions([0, 1]) as writable:
        assert writable == {0, 1}
    assert not fleet.dropped
    assert fleet.log.count(("commit", 0)) == fleet.log.count(("commit", 1)) == 2


async def test_a_slow_commit_fails_the_round_but_keeps_the_writer() -> None:
    """A commit past END_TIMEOUT_S (a transaction coordinator moving) is not a broken
    writer: the round fails and is written again later; the writer stays."""
    fleet = Fleet()
    producers = fenced_producers(fleet, end_timeout_s=0.1)
    await producers.acquire([0])
    fleet.made[0].commit_s = 0.3
    with pytest.raises(KafkaError, match="has not ended"):
        async with producers.transactions([0]):
            pass
    assert not fleet.dropped
    await asyncio.sleep(0.3)  # the commit ends meanwhile
    fleet.made[0].commit_s = 0.0
    async with producers.transactions([0]) as writable:
        assert writable == {0}
    assert fleet.log.count(("commit", 0)) == 2 and not fleet.dropped


async def test_an_old_writers_failure_never_drops_the_new_one() -> None:
    """A round's abort outlives its writer: it waits for batches the broker holds up while
    the partition is released and comes straight back (an eager rebalance) with a new
    writer, whose start fences the old one. The old abort then fails: only the old
    writer may go."""
    fleet = Fleet()
    producers = fenced_producers(fleet)
    await producers.acquire([0])
    old = fleet.made[0]
    old.hang_sends = True

    async def round_that_fails() -> None:
        async with producers.transactions([0]):
            await producers.publisher(0).send_to_partition("ticks.state", 0, [(b"A", b"x", [])])
            raise KafkaError("a send timed out")

    failing = asyncio.create_task(round_that_fails())
    await asyncio.sleep(0.05)  # its abort waits for the held-up batch
    await producers.release([0], timeout_s=1.0)
    await producers.acquire([0])
    new = fleet.made[0]
    old.fenced = True
    old.deliver()
    with pytest.raises(KafkaError, match="a send timed out"):
        await asyncio.wait_for(failing, timeout=5)
    assert new is not old and not fleet.dropped
    assert producers.publisher(0) is not None
    async with producers.transactions([0]) as writable:
        assert writable == {0}
    assert new.state == "READY" and ("commit", 0) in fleet.log


async def test_a_writer_fenced_mid_round_fails_the_round_and_is_dropped() -> None:
    fleet = Fleet()
    producers = fenced_producers(fleet)
    await producers.acquire([0, 1])
    fleet.made[1].fenced = True

    async def round_whose_send_is_fenced() -> None:
        async with producers.transactions([0, 1]):
            fleet.made[1].state = "FATAL"  # its send found the newer epoch
            raise ProducerFenced()

    with pytest.raises(ProducerFenced):
        await round_whose_send_is_fenced()
    assert ("abort", 0) in fleet.log and fleet.dropped == 1
    with pytest.raises(PartitionNotHeldError):
        producers.publisher(1)


async def test_a_round_whose_writer_was_released_ends_without_waiting_for_its_abort() -> None:
    """The revocation's drain timed out: the partition's writer is stopped under a round
    still open on it. aiokafka's abort would wait for good for the stopped sender."""
    fleet = Fleet()
    producers = fenced_producers(fleet, end_timeout_s=60)  # not what ends it
    await producers.acquire([0, 1])

    async def round_cut_short() -> None:
        async with producers.transactions([0, 1]):
            await producers.release([0], timeout_s=1.0)
            raise KafkaError("ProducerClosed")

    with pytest.raises(KafkaError):
        await asyncio.wait_for(round_cut_short(), timeout=5)
    assert ("abort", 1) in fleet.log and ("abort", 0) not in fleet.log

    # Released under a round that goes on to commit (a rebalance during the final
    # rounds): its commit, which would wait for good, is skipped.
    await producers.acquire([0])
    fleet.log.clear()

    async def round_released_then_committed() -> None:
        async with producers.transactions([0, 1]):
            await producers.release([0], timeout_s=1.0)

    await asyncio.wait_for(round_released_then_committed(), timeout=5)
    assert ("commit", 1) in fleet.log and ("commit", 0) not in fleet.log


async def test_a_writer_that_does_not_start_in_time_says_how_to_run_unfenced() -> None:
    fleet = Fleet(hang_start=frozenset({1}))  # no transaction coordinator answers
    producers = fenced_producers(fleet, start_timeout_s=0.2)
    with pytest.raises(KafkaError, match="TICKCAST_STATE_FENCING=false"):
        await asyncio.wait_for(producers.acquire([1]), timeout=5)
    assert fleet.log == [("stop", 1)], "the half-started producer is closed"
    with pytest.raises(PartitionNotHeldError):
        producers.publisher(1)


async def test_one_refused_writer_cancels_and_closes_the_starts_still_running() -> None:
    fleet = Fleet(hang_start=frozenset({2}), fail_start=frozenset({1}))
    producers = fenced_producers(fleet)
    with pytest.raises(KafkaError, match="TransactionalIdAuthorizationFailed"):
        await asyncio.wait_for(producers.acquire([0, 1, 2]), timeout=5)
    assert ("stop", 1) in fleet.log and ("stop", 2) in fleet.log
    for partition in (1, 2):
        with pytest.raises(PartitionNotHeldError):
            producers.publisher(partition)


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


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
    fleet.made[1].state = "FATAL"
    windows = changed_windows()
    writer = StateWriter(producers, "ticks.state", windows)
    pending = writer.take({0: 3, 1: 3})
    assert pending is not None
    writer.submit(pending)
    running = asyncio.create_task(writer.run())
    await asyncio.wait_for(writer.wait_idle(), timeout=5)
    await stop(running)
    assert fleet.made[0].sent == [b"A", b"B", MARKER_KEY]
    assert fleet.made[1].sent == [], "partition 1's state stays as its last owner left it"
    assert pending.written


async def test_an_abandoned_round_is_given_up_and_the_writer_goes_on() -> None:
    fleet = Fleet()
    producers = fenced_producers(fleet, end_timeout_s=0.2)
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
    assert ("abort", 1) in fleet.log
    # The abort of partition 0 waits for its batches, which the cut-off round left alone.
    assert fleet.made[0].pending and not any(f.cancelled() for f in fleet.made[0].pending)
    assert not running.done(), "the writer itself keeps running"

    fleet.made[0].deliver()  # the broker is back: the abort goes through
    again = writer.take({0: 3, 1: 3})
    assert again is not None and sorted(again.snapshot.symbols) == ["A", "B", "C"]
    writer.submit(again)
    await asyncio.wait_for(writer.wait_idle(), timeout=5)
    assert again.written and not fleet.dropped
    assert ("abort", 0) in fleet.log and fleet.made[0].sent[-3:] == [b"A", b"B", MARKER_KEY]
    await stop(running)
