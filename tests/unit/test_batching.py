"""The score loop's batching policy, driven with chunks directly (no broker needed)."""

from __future__ import annotations

import asyncio

import numpy as np

from daemon.batching import PendingWindows
from daemon.pipeline import Chunk, ScoringRows
from daemon.service import TickcastService


def chunk(n: int, start: int = 0) -> Chunk:
    """``n`` ready windows of a rising price (real values do not matter for batching)."""
    windows = 100.0 + np.arange(start, start + n)[:, None] + np.linspace(0, 1, 60)[None, :]
    rows = ScoringRows(
        windows=windows,
        symbols=np.array([f"S{i}" for i in range(start, start + n)], dtype=object),
        prices=windows[:, -1].copy(),
        ts=np.arange(start, start + n, dtype=np.int64) + 1,
        prev_ts=np.arange(start, start + n, dtype=np.int64),
        slots=np.arange(start, start + n, dtype=np.int64),
        partitions=np.zeros(n, np.int32),
        offsets=np.arange(start, start + n, dtype=np.int64),
        consumed_at=np.zeros(n),
    )
    return Chunk(rows=rows, bad=[], commit={}, snapshot=None)


async def batch_sizes(service: TickcastService, chunks: list[Chunk]) -> list[int]:
    for c in chunks:
        await service._chunks.put(c)
    await service._chunks.put(None)
    sizes: list[int] = []
    loop = asyncio.create_task(service._score_loop())
    while (batch := await service._scored.get()) is not None:
        assert batch.inference is not None
        predictions, _ = await batch.inference
        assert len(predictions) == len(batch.rows)
        sizes.append(len(batch.rows))
    await loop
    return sizes


async def test_a_burst_is_split_across_idle_workers(service_factory) -> None:
    service = service_factory(
        inference_workers=2, max_batch_size=4096, live_batch_size=4096, max_batch_delay_ms=20
    )
    assert await batch_sizes(service, [chunk(1000)]) == [500, 500]


async def test_one_worker_takes_the_burst_whole(service_factory) -> None:
    service = service_factory(
        inference_workers=1, max_batch_size=4096, live_batch_size=4096, max_batch_delay_ms=20
    )
    assert await batch_sizes(service, [chunk(1000)]) == [1000]


async def test_the_batch_size_limit_still_holds(service_factory) -> None:
    service = service_factory(inference_workers=1, max_batch_size=256, max_batch_delay_ms=20)
    sizes = await batch_sizes(service, [chunk(600), chunk(100, start=600)])
    assert max(sizes) <= 256 and sum(sizes) == 700


async def test_windows_gather_while_every_worker_is_busy(service_factory) -> None:
    """A batch is not submitted to a busy pool: later chunks join it instead."""
    service = service_factory(
        inference_workers=1, max_batch_size=4096, live_batch_size=4096, max_batch_delay_ms=0
    )
    service._busy_workers = 2  # a pass running and a full batch queued behind it
    for c in (chunk(10), chunk(20, start=10), chunk(30, start=30)):
        await service._chunks.put(c)
    loop = asyncio.create_task(service._score_loop())
    await asyncio.sleep(0.05)
    assert service._scored.empty(), "submitted although no worker was idle"
    service._on_batch_scored(None)  # the running pass finishes; the queued one starts
    await asyncio.sleep(0.05)
    assert service._scored.empty(), "submitted although no worker was idle"
    service._on_batch_scored(None)  # and finishes
    batch = await service._scored.get()
    assert batch is not None and len(batch.rows) == 60  # all three chunks, one batch
    await service._chunks.put(None)
    assert await service._scored.get() is None
    await loop


async def test_caught_up_batches_stop_at_the_live_size(service_factory) -> None:
    """No backlog behind the last fetch: shorter batches; a backlog: full-size ones."""
    service = service_factory(
        inference_workers=1, max_batch_size=1024, live_batch_size=256, max_batch_delay_ms=20
    )
    service._caught_up = True
    assert await batch_sizes(service, [chunk(1000)]) == [256, 256, 256, 232]
    service = service_factory(
        inference_workers=1, max_batch_size=1024, live_batch_size=256, max_batch_delay_ms=20
    )
    service._caught_up = False
    assert await batch_sizes(service, [chunk(1000)]) == [1000]


def empty_chunk() -> Chunk:
    """A fetch of only bad ticks (or of windows not yet full): nothing to score."""
    return Chunk(rows=ScoringRows.empty(60), bad=[], commit={}, snapshot=None)


def test_a_chunk_split_across_batches_completes_with_its_last_row() -> None:
    pending = PendingWindows()
    first, second = chunk(300), chunk(100, start=300)
    pending.add(first, now=1.0)
    pending.add(second, now=2.0)
    parts, completed = pending.take(256)
    assert [len(p) for p in parts] == [256] and completed == []
    assert pending.rows == 144 and pending.oldest_arrival == 1.0
    parts, completed = pending.take(256)
    assert [len(p) for p in parts] == [44, 100] and completed == [first, second]
    # The rows go out once each, in order.
    assert parts[0].offsets[0] == 256 and parts[1].offsets[-1] == 399
    assert pending.rows == 0 and not pending


def test_chunks_without_windows_ride_along_with_the_batch_before_them() -> None:
    pending = PendingWindows()
    full, bad_only = chunk(10), empty_chunk()
    pending.add(full, now=0.0)
    pending.add(bad_only, now=0.0)
    parts, completed = pending.take(10)
    assert [len(p) for p in parts] == [10] and completed == [full, bad_only]
    assert not pending


def test_exactly_once_never_splits_a_chunk() -> None:
    pending = PendingWindows()
    big, small, next_one = chunk(300), chunk(50, start=300), chunk(100, start=350)
    for c in (big, small, next_one):
        pending.add(c, now=0.0)
    # The first chunk goes whole even past the limit; the next waits for another batch.
    parts, completed = pending.take(256, whole_chunks=True)
    assert [len(p) for p in parts] == [300] and completed == [big]
    parts, completed = pending.take(256, whole_chunks=True)
    assert [len(p) for p in parts] == [50, 100] and completed == [small, next_one]
    assert pending.rows == 0
