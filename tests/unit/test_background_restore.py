"""Restores run in the background with their partitions paused.

aiokafka sends no heartbeats while a rebalance listener runs, so on_assigned only pauses the
new partitions and starts a task that rebuilds their windows; the member heartbeats
meanwhile. These tests drive the service's rebalance methods with a fake group consumer
(the real one is exercised in tests/integration/test_slow_restore.py) and a restore that
finishes only when the test says so.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import TopicPartition

import daemon.service
from daemon.restore import RestoreStats
from daemon.service import TickcastService
from tests.support.polling import wait_until
from tests.unit.conftest import ServiceFactory

P0, P1, P2 = (TopicPartition("ticks", p) for p in range(3))


class GroupConsumer:
    """What the service asks of the group consumer around a rebalance."""

    def __init__(self, assigned: Iterable[TopicPartition], position: int | None = 5) -> None:
        self.assigned = set(assigned)
        self.paused: set[TopicPartition] = set()
        self._position = position

    def reassign(self, tps: Iterable[TopicPartition]) -> None:
        """A rebalance: aiokafka keeps fresh state per assignment, unpaused."""
        self.assigned = set(tps)
        self.paused.clear()

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *tps: TopicPartition) -> None:
        assert set(tps) <= self.assigned, "only assigned partitions can be paused"
        self.paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused.difference_update(tps)

    async def position(self, tp: TopicPartition) -> int:
        """Where fetching starts: the committed offset (resolved while paused, too)."""
        assert tp in self.assigned, f"{tp} is not assigned"
        if self._position is None:
            raise KafkaConnectionError(f"no coordinator for {tp}")
        return self._position


class GatedRestore:
    """Stands in for restore_windows: records its calls, returns when opened."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls: list[dict[TopicPartition, int]] = []
        self.cancelled = 0

    async def __call__(self, windows: Any, until: dict[TopicPartition, int], **_: Any) -> Any:
        self.calls.append(dict(until))
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return RestoreStats(snapshots=0, replayed=0, seconds=0.0)


@pytest.fixture
def restore(monkeypatch: pytest.MonkeyPatch) -> GatedRestore:
    gated = GatedRestore()
    monkeypatch.setattr(daemon.service, "restore_windows", gated)
    return gated


@pytest.fixture
def service(service_factory: ServiceFactory) -> TickcastService:
    return service_factory()


def gauge(service: TickcastService, name: str) -> float | None:
    return service.metrics.registry.get_sample_value(name)


async def test_assignment_returns_at_once_and_scores_after_the_restore(
    service: TickcastService, restore: GatedRestore
) -> None:
    consumer = GroupConsumer({P0, P1})
    service._consumer = consumer

    # Returns while the restore is still waiting: the rebalance (and heartbeats) go on.
    await asyncio.wait_for(service.on_assigned([P0, P1]), timeout=5)
    await wait_until(lambda: restore.calls, what="the restore to start")
    assert restore.calls == [{P0: 5, P1: 5}]
    assert consumer.paused == {P0, P1}
    assert not service.readiness()["partitions_assigned"]
    assert gauge(service, "tickcast_restoring_partitions") == 2
    assert gauge(service, "tickcast_assigned_partitions") == 2

    restore.gate.set()
    await wait_until(lambda: not consumer.paused, what="the partitions to resume")
    assert service._ready_partitions == {P0, P1}
    assert service._positions == {P0: 5, P1: 5}
    assert service.readiness()["partitions_assigned"]
    assert gauge(service, "tickcast_restoring_partitions") == 0


async def test_revocation_cancels_a_restore_in_progress(
    service: TickcastService, restore: GatedRestore
) -> None:
    consumer = GroupConsumer({P0})
    service._consumer = consumer
    await service.on_assigned([P0])
    await wait_until(lambda: restore.calls, what="the restore to start")

    await asyncio.wait_for(service.on_revoked([P0]), timeout=5)
    assert restore.cancelled == 1
    assert P0 not in service._ready_partitions
    assert not service._restoring and not service.failed
    assert gauge(service, "tickcast_restoring_partitions") == 0

    # The next assignment restores afresh and completes.
    consumer.reassign({P1})
    restore.gate.set()
    await service.on_assigned([P1])
    await wait_until(lambda: P1 in service._ready_partitions, what="P1 to be restored")
    assert restore.calls[-1] == {P1: 5}
    assert not consumer.paused


async def test_backpressure_lifting_leaves_restoring_partitions_paused(
    service: TickcastService, restore: GatedRestore
) -> None:
    consumer = GroupConsumer({P0, P1})
    service._consumer = consumer
    await service.on_assigned([P1])
    service._ready_partitions = {P0}
    backpressure = asyncio.create_task(service._pause_until_drained(consumer, 0))
    await wait_until(lambda: consumer.paused == {P0, P1}, what="backpressure to pause")

    service._resume.set()  # inference caught up
    await backpressure
    assert consumer.paused == {P1}, "P1's windows are not restored yet"
    restore.gate.set()
    await wait_until(lambda: not consumer.paused, what="P1 to resume after its restore")


async def test_partitions_restored_under_backpressure_resume_when_it_lifts(
    service: TickcastService, restore: GatedRestore
) -> None:
    consumer = GroupConsumer({P0})
    service._consumer = consumer
    service._ready_partitions = {P0}
    backpressure = asyncio.create_task(service._pause_until_drained(consumer, 0))
    await wait_until(lambda: consumer.paused == {P0}, what="backpressure to pause")

    # A rebalance meanwhile (eager: everything is revoked and assigned again).
    await service.on_revoked([P0])
    consumer.reassign({P0, P1, P2})
    await service.on_assigned([P0, P1, P2])
    restore.gate.set()
    await wait_until(lambda: not service._restoring, what="the restore to finish")
    assert consumer.paused == {P0, P1, P2}, "backpressure still holds"

    service._resume.set()
    await backpressure
    assert not consumer.paused, "partitions assigned during backpressure were left paused"


async def test_failed_restore_stops_the_daemon(
    service: TickcastService, caplog: pytest.LogCaptureFixture
) -> None:
    """aiokafka would only log a listener's exception and leave the partitions paused
    unscored for good; the daemon stops instead (exit 1) and the group moves them."""
    consumer = GroupConsumer({P0}, position=None)  # the group coordinator is unreachable
    service._consumer = consumer
    await service.on_assigned([P0])
    await wait_until(service.should_exit.is_set, what="the daemon to stop")
    assert service.failed
    assert P0 not in service._ready_partitions
    assert "restoring partitions" in caplog.text and "no coordinator" in caplog.text


async def test_no_restore_starts_once_the_daemon_is_stopping(
    service: TickcastService, restore: GatedRestore
) -> None:
    """A rebalance while shutting down (other pods rolling) pauses the partitions and
    restores nothing: no task would be left reading after the stop."""
    consumer = GroupConsumer({P0})
    service._consumer = consumer
    service._stopping = True
    await service.on_assigned([P0])
    assert service._restore_task is None and not restore.calls
    assert consumer.paused == {P0}


async def test_cancelling_a_revocation_is_not_swallowed(
    service: TickcastService, restore: GatedRestore
) -> None:
    """on_revoked cancels the restore and waits for it; if on_revoked itself is cancelled
    meanwhile, that cancellation must propagate, not be taken for the restore's."""
    consumer = GroupConsumer({P0})
    service._consumer = consumer
    await service.on_assigned([P0])
    await wait_until(lambda: restore.calls, what="the restore to start")
    revoking = asyncio.create_task(service._cancel_restore())
    await asyncio.sleep(0)  # let it cancel the restore and start waiting for it
    revoking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await revoking
    assert revoking.cancelled()


async def test_a_revocation_while_stopping_does_not_wait_for_the_stopped_state_writer(
    service: TickcastService,
) -> None:
    """Shutdown cancels the state writer first; a rebalance then (other pods rolling) must
    not wait the whole SHUTDOWN_TIMEOUT_S for it to become idle."""

    class Stopped:
        async def wait_idle(self) -> None:
            await asyncio.Event().wait()  # nothing will ever write

        def discard_queued(self) -> None:
            raise AssertionError("nothing to discard: the wait must not time out")

    consumer = GroupConsumer({P0})
    service._consumer = consumer
    service._state_writer = Stopped()  # type: ignore[assignment]
    service._stopping = True
    service.settings = service.settings.model_copy(update={"shutdown_timeout_s": 600})
    await asyncio.wait_for(service.on_revoked([P0]), timeout=30)
    assert gauge(service, "tickcast_assigned_partitions") == 0


class RecordingStateProducers:
    """Stands in for the fenced state writers: records what is taken and given back."""

    def __init__(self, restore: GatedRestore) -> None:
        self.restore = restore
        self.events: list[tuple[str, set[int], int]] = []  # (what, partitions, restores)

    async def acquire(self, partitions: Iterable[int]) -> None:
        self.events.append(("acquire", set(partitions), len(self.restore.calls)))

    async def release(self, partitions: Iterable[int], timeout_s: float) -> None:
        self.events.append(("release", set(partitions), len(self.restore.calls)))


class StuckStateWriter:
    """A state writer whose round hangs (the broker stopped answering)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def wait_idle(self) -> None:
        await asyncio.Event().wait()

    def discard_queued(self) -> None:
        self.calls.append("discard_queued")

    def abandon_current(self) -> None:
        self.calls.append("abandon_current")


async def test_state_writers_fence_before_the_restore_and_go_at_revocation(
    service_factory: ServiceFactory, restore: GatedRestore
) -> None:
    """The restore reads the state topic only once the previous writers are fenced; a
    revocation whose drain timed out (here: a snapshot round hangs) cuts that round short
    and still gives the writers up (a write left open is the next owner's to abort)."""
    service = service_factory(shutdown_timeout_s=0.2)
    producers = RecordingStateProducers(restore)
    service._state_producers = producers  # type: ignore[assignment]
    consumer = GroupConsumer({P0, P2})
    service._consumer = consumer
    await service.on_assigned([P0, P2])
    await wait_until(lambda: restore.calls, what="the restore to start")
    assert producers.events == [("acquire", {0, 2}, 0)], "fenced before the restore read"

    restore.gate.set()
    await wait_until(lambda: not service._restoring, what="the restore to finish")
    writer = StuckStateWriter()
    service._state_writer = writer  # type: ignore[assignment]
    await asyncio.wait_for(service.on_revoked([P0, P2]), timeout=5)
    assert writer.calls == ["discard_queued", "abandon_current"], "the stuck round is cut"
    assert producers.events[-1] == ("release", {0, 2}, 1)
