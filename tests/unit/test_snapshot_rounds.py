"""The service takes snapshot rounds of at most SNAPSHOT_MAX_SYMBOLS: every interval, and
back to back while a written round left changed symbols behind; at shutdown, until none is
left. Driven through the service's own methods with a recording publisher (no Kafka)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
from aiokafka.structs import TopicPartition

from daemon.service import COMMIT_ATTEMPTS, TickcastService
from daemon.state_store import (
    MARKER_KEY,
    PendingSnapshot,
    SharedStateProducer,
    StateWriter,
    decode_marker,
)
from model.data import load_series
from tests.unit.conftest import ServiceFactory

P0 = TopicPartition("ticks", 0)
SYMBOLS = [f"S{i}" for i in range(7)]
# The last round "was taken" this long ago: any interval has passed. (Not 0.0: the
# monotonic clock counts from boot, so on a machine up for less than the interval
# 0.0 would not be long enough ago.)
INTERVAL_PASSED = float("-inf")


class Recording:
    """Acknowledges every send at once; keeps what each partition received, in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes | None, bytes]] = []

    async def send_to_partition(self, topic: str, partition: int, records: list) -> list:
        self.sent += [(key, value) for key, value, _ in records]
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return [SimpleNamespace(future=done)]

    def symbols(self) -> list[bytes]:
        return [k for k, _ in self.sent if k is not None and k != MARKER_KEY]

    def markers(self) -> list[int | None]:
        return [decode_marker(v) for k, v in self.sent if k == MARKER_KEY]


@pytest.fixture
def service(service_factory: ServiceFactory) -> TickcastService:
    service = service_factory(snapshot_interval_s=3600, snapshot_max_symbols=3)
    # Seven symbols on partition 0, first seen at offsets 0..6, fetched up to offset 7.
    prices = load_series("dataset:goog")[0].prices[:7]
    slots = service.windows.slots_for(SYMBOLS, np.zeros(7, np.int32), np.arange(7))
    service.windows.apply(slots, prices, np.ones(7, np.int64))
    service._positions = {P0: 7}
    service._ready_partitions = {P0}
    return service


def attach_writer(service: TickcastService) -> tuple[StateWriter, Recording]:
    publisher = Recording()
    writer = StateWriter(SharedStateProducer(publisher), "ticks.state", service.windows)  # type: ignore[arg-type]
    service._state_writer = writer
    return writer, publisher


def unsaved(service: TickcastService) -> float | None:
    return service.metrics.registry.get_sample_value("tickcast_snapshot_unsaved_symbols")


async def test_rounds_follow_each_other_while_changed_symbols_are_left(
    service: TickcastService,
) -> None:
    writer, publisher = attach_writer(service)
    task = asyncio.create_task(writer.run())
    try:
        assert service._maybe_snapshot() is None  # the interval has not passed
        service._last_snapshot = INTERVAL_PASSED
        first = service._maybe_snapshot()
        assert first is not None and len(first.snapshot) == 3
        assert first.round.markers == {0: 3}  # S3 (first tick at offset 3) is unsaved
        assert unsaved(service) == 4
        # Not written yet: no next round, even once the interval has passed (copies would
        # pile up behind a slow state topic).
        service._last_snapshot = INTERVAL_PASSED
        assert service._maybe_snapshot() is None
        service._write_snapshot(first, committed=True)
        await asyncio.wait_for(writer.wait_idle(), 10)
        second = service._maybe_snapshot()  # written: the next follows at once
        assert second is not None and len(second.snapshot) == 3
        service._write_snapshot(second, committed=True)
        await asyncio.wait_for(writer.wait_idle(), 10)
        third = service._maybe_snapshot()
        assert third is not None and len(third.snapshot) == 1
        assert third.round.markers == {0: 7} and unsaved(service) == 0
        service._write_snapshot(third, committed=True)
        await asyncio.wait_for(writer.wait_idle(), 10)
        assert service._maybe_snapshot() is None  # nothing left until the next interval
    finally:
        task.cancel()
    assert sorted(publisher.symbols()) == sorted(s.encode() for s in SYMBOLS)
    assert publisher.markers() == [3, 6, 7]


async def test_a_round_not_committed_is_taken_again_at_the_next_interval(
    service: TickcastService,
) -> None:
    attach_writer(service)
    service._last_snapshot = INTERVAL_PASSED
    first = service._maybe_snapshot()
    assert first is not None
    service._write_snapshot(first, committed=False)  # its commit failed
    assert service._maybe_snapshot() is None  # no backlog round: back to the interval
    assert service.windows.dirty.sum() == 7  # its symbols wait for a later round
    service._last_snapshot = INTERVAL_PASSED
    again = service._maybe_snapshot()
    assert again is not None
    assert sorted(again.snapshot.symbols) == sorted(first.snapshot.symbols)
    assert again.round.markers == first.round.markers == {0: 3}


async def test_a_round_of_an_ended_assignment_is_not_written(
    service: TickcastService,
) -> None:
    """A revocation whose drain timed out leaves chunks in flight; a round riding one of
    them would land after the partitions' next owner wrote newer snapshots."""
    from daemon.pipeline import Chunk, ScoringRows

    writer, publisher = attach_writer(service)
    service._commit = fake_commit  # type: ignore[method-assign]
    service._last_snapshot = INTERVAL_PASSED
    taken = service._maybe_snapshot()
    assert taken is not None
    chunk = Chunk(rows=ScoringRows.empty(60), bad=[], commit={}, snapshot=taken)
    chunk.assignment = service._assignment
    service._assignment += 1  # the revocation ended meanwhile
    service._inflight_chunks = 1
    await service._commit_acknowledged(None, [chunk])
    task = asyncio.create_task(writer.run())
    try:
        await asyncio.wait_for(writer.wait_idle(), 10)
    finally:
        task.cancel()
    assert publisher.sent == []
    assert taken.settled and not taken.written
    assert service.windows.dirty.sum() == 7


async def fake_commit(consumer: object, offsets: dict[TopicPartition, int]) -> bool:
    return True


async def test_the_forced_round_at_shutdown_gives_up_one_cut_off_with_its_chunk(
    service: TickcastService,
) -> None:
    """The drain timed out with a round still in a chunk: its symbols were marked clean
    but will never be written, so the final rounds must carry them and hold the marker."""
    _, publisher = attach_writer(service)
    service._last_snapshot = INTERVAL_PASSED
    cut_off = service._maybe_snapshot()  # S0..S2, never committed
    assert cut_off is not None
    await asyncio.wait_for(service._write_final_snapshots(service._state_writer), 10)  # type: ignore[arg-type]
    assert sorted(publisher.symbols()) == sorted(s.encode() for s in SYMBOLS)
    assert publisher.markers() == [3, 6, 7]


async def test_shutdown_writes_every_changed_symbol_a_round_at_a_time(
    service: TickcastService, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, publisher = attach_writer(service)
    largest: list[int] = []
    take = writer.take

    def recorded_take(
        positions: dict[int, int], max_symbols: int | None = None
    ) -> PendingSnapshot | None:
        pending = take(positions, max_symbols)
        largest.append(len(pending.snapshot) if pending else 0)
        return pending

    monkeypatch.setattr(writer, "take", recorded_take)
    await asyncio.wait_for(service._write_final_snapshots(writer), 10)
    assert sorted(publisher.symbols()) == sorted(s.encode() for s in SYMBOLS)
    # Each marker waits for the symbols left behind (first ticks at offsets 3, then 6).
    assert publisher.markers() == [3, 6, 7]
    assert max(largest) == 3
    assert not service.windows.dirty.any()


async def test_no_final_rounds_after_a_failed_commit(service: TickcastService) -> None:
    """Their markers would lie above the committed offset: the next owner would distrust
    the whole state topic and replay each partition from its start."""
    _, publisher = attach_writer(service)
    service._last_commit_ok = False
    await asyncio.wait_for(service._write_final_snapshots(service._state_writer), 10)  # type: ignore[arg-type]
    assert publisher.sent == []
    assert service.windows.dirty.sum() == 7


async def test_the_latest_commit_decides_whether_final_rounds_are_written(
    service: TickcastService,
) -> None:
    from daemon.pipeline import Chunk, ScoringRows

    attach_writer(service)
    results = iter([False, True])

    async def commit(consumer: object, offsets: dict[TopicPartition, int]) -> bool:
        return next(results)

    service._commit = commit  # type: ignore[method-assign]
    for expected in (False, True):
        chunk = Chunk(rows=ScoringRows.empty(60), bad=[], commit={P0: 7})
        chunk.assignment = service._assignment
        service._inflight_chunks = 1
        await service._commit_acknowledged(CommittingConsumer(), [chunk])
        assert service._last_commit_ok is expected


P1 = TopicPartition("ticks", 1)


class CommittingConsumer:
    """Holds partitions 0 and 1; its first ``failures`` commits fail. Records every
    commit asked for and what the group holds."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.asked: list[dict[TopicPartition, int]] = []
        self.committed: dict[TopicPartition, int] = {}

    def assignment(self) -> set[TopicPartition]:
        return {P0, P1}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        from aiokafka.errors import KafkaError

        self.asked.append(dict(offsets))
        if self.failures:
            self.failures -= 1
            raise KafkaError("coordinator not available")
        self.committed.update(offsets)


def acked(service: TickcastService, commit: dict[TopicPartition, int], snapshot: bool = False):
    from daemon.pipeline import Chunk, ScoringRows

    if snapshot:
        service._last_snapshot = INTERVAL_PASSED
    round_ = service._maybe_snapshot() if snapshot else None
    chunk = Chunk(rows=ScoringRows.empty(60), bad=[], commit=commit, snapshot=round_)
    chunk.assignment = service._assignment
    service._inflight_chunks += 1
    return chunk


async def test_a_failed_commit_is_retried_by_an_idle_round_before_its_marker_goes_out(
    service: TickcastService,
) -> None:
    """Without the retry the idle round (no offsets of its own) counted as committed and
    wrote marker 7 over a committed offset of nothing: the next owner would have
    distrusted the state topic and replayed the whole partition."""
    writer, publisher = attach_writer(service)
    task = asyncio.create_task(writer.run())
    consumer = CommittingConsumer(failures=2 * COMMIT_ATTEMPTS)
    try:
        await service._commit_acknowledged(consumer, [acked(service, {P0: 7})])
        assert not service._last_commit_ok and consumer.committed == {}
        # Idle: a round with no offsets. Its commit retries offset 7 and fails once more.
        await service._commit_acknowledged(consumer, [acked(service, {}, snapshot=True)])
        await asyncio.wait_for(writer.wait_idle(), 5)
        assert consumer.asked[-1] == {P0: 7}
        assert not service._last_commit_ok
        assert publisher.markers() == []  # the round was given up: its symbols wait
        # The next idle round's commit goes through: now its marker may go out.
        await service._commit_acknowledged(consumer, [acked(service, {}, snapshot=True)])
        await asyncio.wait_for(writer.wait_idle(), 5)
        assert consumer.committed == {P0: 7} and service._last_commit_ok
        assert publisher.markers() and max(m for m in publisher.markers() if m) <= 7
    finally:
        task.cancel()


async def test_a_commit_of_other_partitions_carries_the_failed_ones(
    service: TickcastService,
) -> None:
    consumer = CommittingConsumer(failures=COMMIT_ATTEMPTS)
    await service._commit_acknowledged(consumer, [acked(service, {P0: 7})])
    assert not service._last_commit_ok
    await service._commit_acknowledged(consumer, [acked(service, {P1: 3})])
    assert consumer.asked[-1] == {P0: 7, P1: 3}  # not P1 alone
    assert consumer.committed == {P0: 7, P1: 3} and service._last_commit_ok
    # Newer offsets of the same partition replace the carried ones.
    consumer.failures = COMMIT_ATTEMPTS
    await service._commit_acknowledged(consumer, [acked(service, {P0: 9})])
    await service._commit_acknowledged(consumer, [acked(service, {P0: 12})])
    assert consumer.asked[-1] == {P0: 12} and consumer.committed[P0] == 12


async def test_a_revocation_tries_the_failed_commit_once_more_then_drops_it(
    service: TickcastService,
) -> None:
    consumer = CommittingConsumer(failures=COMMIT_ATTEMPTS)
    service._consumer = consumer
    await service._commit_acknowledged(consumer, [acked(service, {P0: 7})])
    assert consumer.committed == {}
    await service.on_revoked([P0, P1])  # the last moment this member can commit them
    assert consumer.committed == {P0: 7}
    consumer.failures = 2 * COMMIT_ATTEMPTS
    await service._commit_acknowledged(consumer, [acked(service, {P0: 9})])
    await service.on_revoked([P0, P1])  # fails again: the next owner is redelivered them
    await service._commit_acknowledged(consumer, [acked(service, {P1: 3})])
    assert consumer.asked[-1] == {P1: 3} and consumer.committed == {P0: 7, P1: 3}


async def test_the_last_commit_at_shutdown_retries_a_failed_one(
    service: TickcastService,
) -> None:
    """Nothing new was acknowledged before the stop: the carried offsets still get their
    try, or the next owner is redelivered them and the final snapshots are skipped."""
    consumer = CommittingConsumer(failures=COMMIT_ATTEMPTS)
    service._consumer = consumer
    service._publisher = object()  # type: ignore[assignment]
    await service._commit_acknowledged(consumer, [acked(service, {P0: 7})])
    assert not service._last_commit_ok
    await service._dispatched.put(None)  # the pipeline's end
    await asyncio.wait_for(service._ack_loop(), 10)
    assert consumer.committed == {P0: 7} and service._last_commit_ok
