"""``tickcast replay``'s restamping and delivery accounting, against an in-memory producer."""

from __future__ import annotations

import asyncio
import itertools
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka.errors import KafkaTimeoutError

from daemon.replay import ReplayError, Restamper, TickStream, replay


class FakeBatch:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.values: list[bytes] = []

    def append(self, *, key: bytes | None, value: bytes, timestamp: Any, headers: Any) -> object:
        if len(self.values) >= self.capacity:
            return None
        self.values.append(value)
        return object()


class FakeProducer:
    """Just what BatchPublisher uses; acks every batch at once, or fails after ``ok``."""

    def __init__(self, ok: int | None = None, capacity: int = 50) -> None:
        self.ok = ok  # batches acknowledged before every later one fails
        self.capacity = capacity
        self.sent: list[tuple[float, list[bytes]]] = []  # (wall clock ms, values)

        async def wait_on_metadata(topic: str) -> None:
            return None

        self.client = SimpleNamespace(
            _wait_on_metadata=wait_on_metadata,
            cluster=SimpleNamespace(partitions_for_topic=lambda topic: {0, 1, 2}),
        )

    def create_batch(self) -> FakeBatch:
        return FakeBatch(self.capacity)

    async def send_batch(self, batch: FakeBatch, topic: str, partition: int) -> asyncio.Future:
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        if self.ok is not None and len(self.sent) >= self.ok:
            future.set_exception(KafkaTimeoutError("batch expired"))
        else:
            future.set_result(None)
        self.sent.append((time.time() * 1000, batch.values))
        return future

    def ticks(self) -> list[tuple[float, dict[str, Any]]]:
        return [(wall, orjson.loads(v)) for wall, values in self.sent for v in values]


def round_robin(n_symbols: int, per_symbol: int) -> TickStream:
    symbols = np.array([f"S{i}" for i in range(n_symbols)] * per_symbol, dtype=object)
    n = len(symbols)
    return TickStream(symbols, np.linspace(100.0, 200.0, n), np.arange(n, dtype=np.int64))


def test_restamper_takes_the_clock_unless_the_symbol_already_ticked_this_ms() -> None:
    stamper = Restamper()
    first = stamper.stamp(np.array(["A", "B", "A", "B", "C"], dtype=object), now_ms=1_000)
    assert first.tolist() == [1_000, 1_000, 1_001, 1_001, 1_000]
    # Same millisecond again: each symbol continues after its own last stamp.
    again = stamper.stamp(np.array(["C", "A", "D"], dtype=object), now_ms=1_000)
    assert again.tolist() == [1_001, 1_002, 1_000]
    # The clock moved past every symbol's last stamp: the clock it is.
    later = stamper.stamp(np.array(["A", "C", "A"], dtype=object), now_ms=5_000)
    assert later.tolist() == [5_000, 5_000, 5_001]
    assert stamper.stamp(np.array([], dtype=object), now_ms=6_000).tolist() == []


async def test_restamped_ticks_keep_up_with_the_clock_at_a_high_rate() -> None:
    """10,000 ticks at 20,000/s over 200 symbols: the old stamping (1 ms per tick across
    the whole stream) ran 10 s ahead of the clock by the end."""
    stream = round_robin(n_symbols=200, per_symbol=50)
    producer = FakeProducer()
    sent = await replay(producer, "ticks", stream, rate=20_000, restamp=True)
    assert sent == len(stream)
    ticks = producer.ticks()
    assert len(ticks) == len(stream)
    ahead_ms = max(tick["ts"] - wall for wall, tick in ticks)
    assert ahead_ms < 1_000, f"event times ran {ahead_ms:.0f} ms ahead of the wall clock"
    for symbol in {tick["symbol"] for _, tick in ticks}:
        ts = [tick["ts"] for _, tick in ticks if tick["symbol"] == symbol]
        assert len(ts) == 50
        assert all(b > a for a, b in itertools.pairwise(ts)), symbol


async def test_replay_without_restamp_keeps_the_historic_times() -> None:
    stream = round_robin(n_symbols=3, per_symbol=4)
    producer = FakeProducer()
    assert await replay(producer, "ticks", stream) == len(stream)
    assert sorted(tick["ts"] for _, tick in producer.ticks()) == stream.ts.tolist()


async def test_a_failed_delivery_reports_how_many_ticks_were_acknowledged() -> None:
    stream = round_robin(n_symbols=3, per_symbol=400)
    producer = FakeProducer(ok=4, capacity=50)
    with pytest.raises(ReplayError) as failed:
        await replay(producer, "ticks", stream, chunk=100)
    acknowledged = sum(len(values) for _, values in producer.sent[:4])
    assert 0 < acknowledged < len(stream)
    assert failed.value.acknowledged == acknowledged
    assert isinstance(failed.value.cause, KafkaTimeoutError)
    assert f"({acknowledged} ticks acknowledged)" in str(failed.value)


def test_merge_refuses_a_negative_limit() -> None:
    stream = round_robin(n_symbols=2, per_symbol=3)
    from model.data import PriceSeries

    series = [
        PriceSeries(s, "test", stream.ts[stream.symbols == s], stream.prices[stream.symbols == s])
        for s in ("S0", "S1")
    ]
    assert len(TickStream.merge(series, limit=0)) == 0
    assert len(TickStream.merge(series, limit=6)) == 6
    with pytest.raises(ValueError, match="at least 0"):
        TickStream.merge(series, limit=-1)
