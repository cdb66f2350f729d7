"""The service takes snapshot rounds of at most SNAPSHOT_MAX_SYMBOLS: every interval, and
back to back while a written round left changed symbols behind; at shutdown, until none is
left. Driven through the service's own methods with a recording publisher (no Kafka)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from daemon.metrics import DaemonMetrics
from daemon.service import TickcastService
from daemon.settings import Settings
from daemon.state_store import MARKER_KEY, PendingSnapshot, StateWriter, decode_marker
from model.data import load_series
from tests.support.daemon import make_checkpoint

P0 = TopicPartition("ticks", 0)
SYMBOLS = [f"S{i}" for i in range(7)]


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
async def service(tmp_path: Path) -> AsyncIterator[TickcastService]:
    make_checkpoint(tmp_path)
    settings = Settings(
        checkpoint_dir=tmp_path, device="cpu", snapshot_interval_s=3600, snapshot_max_symbols=3
    )
    service = TickcastService(settings, DaemonMetrics(CollectorRegistry(), process=False))
    # Seven symbols on partition 0, first seen at offsets 0..6, fetched up to offset 7.
    prices = load_series("dataset:goog")[0].prices[:7]
    slots = service.windows.slots_for(SYMBOLS, np.zeros(7, np.int32), np.arange(7))
    service.windows.apply(slots, prices, np.ones(7, np.int64))
    service._positions = {P0: 7}
    service._ready_partitions = {P0}
    try:
        yield service
    finally:
        service._inference.shutdown()


def attach_writer(service: TickcastService) -> tuple[StateWriter, Recording]:
    publisher = Recording()
    writer = StateWriter(publisher, "ticks.state", service.windows)  # type: ignore[arg-type]
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
        service._last_snapshot = 0.0
        first = service._maybe_snapshot()
        assert first is not None and len(first.snapshot) == 3
        assert first.round.markers == {0: 3}  # S3 (first tick at offset 3) is unsaved
        assert unsaved(service) == 4
        # Not written yet: the next round waits (its copy would pile up behind this one).
        assert service._maybe_snapshot() is None
        service._write_snapshots([first], committed=True)
        await asyncio.wait_for(writer.wait_idle(), 10)
        second = service._maybe_snapshot()  # written: the next follows at once
        assert second is not None and len(second.snapshot) == 3
        service._write_snapshots([second], committed=True)
        await asyncio.wait_for(writer.wait_idle(), 10)
        third = service._maybe_snapshot()
        assert third is not None and len(third.snapshot) == 1
        assert third.round.markers == {0: 7} and unsaved(service) == 0
        service._write_snapshots([third], committed=True)
        await asyncio.wait_for(writer.wait_idle(), 10)
        assert service._maybe_snapshot() is None  # nothing left until the next interval
    finally:
        task.cancel()
    assert sorted(publisher.symbols()) == sorted(s.encode() for s in SYMBOLS)
    assert publisher.markers() == [3, 6, 7]


async def test_a_round_not_committed_does_not_start_the_next_at_once(
    service: TickcastService,
) -> None:
    _, publisher = attach_writer(service)
    service._last_snapshot = 0.0
    first = service._maybe_snapshot()
    assert first is not None
    service._write_snapshots([first], committed=False)  # its commit failed
    assert service._maybe_snapshot() is None  # back to the interval
    assert service.windows.dirty.sum() == 7  # its symbols wait for a later round
    assert publisher.sent == []


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
    assert publisher.markers()[-1] == 7  # the last marker: nothing left to replay
    assert max(largest) == 3
    assert not service.windows.dirty.any()
