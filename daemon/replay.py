"""``tickcast replay``: produce real price series as ticks.

Several series are interleaved by event time (a k-way merge), keyed by symbol, at a fixed
rate or as fast as the broker takes them. ``restamp`` replaces historic event times with
the wall clock (strictly increasing per symbol), for live demos and latency measurements.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from aiokafka import AIOKafkaProducer
from tqdm import tqdm

from daemon.publisher import BatchPublisher, Delivery, OutRecord
from daemon.ticks import encode_ticks, tick_prefix
from model.data import PriceSeries

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TickStream:
    """Ticks of several series merged in event-time order (ties keep series order)."""

    symbols: np.ndarray  # object
    prices: np.ndarray  # float64
    ts: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.ts)

    @staticmethod
    def merge(series: Sequence[PriceSeries], limit: int | None = None) -> TickStream:
        if not series:
            raise ValueError("no series to replay")
        symbols = np.concatenate([np.full(len(s), s.symbol, dtype=object) for s in series])
        prices = np.concatenate([s.prices for s in series])
        ts = np.concatenate([s.ts for s in series])
        order = np.argsort(ts, kind="stable")
        if limit is not None:
            order = order[:limit]
        return TickStream(symbols[order], prices[order], ts[order])

    def records(self, start: int, stop: int, restamp_ms: int | None = None) -> list[OutRecord]:
        """Tick records for rows [start, stop); with ``restamp_ms`` each gets a fresh ts."""
        ts = self.ts[start:stop]
        if restamp_ms is not None:
            # Same ms for a whole slice would make later ticks of a symbol "not newer";
            # spread them by one ms each.
            ts = restamp_ms + np.arange(stop - start, dtype=np.int64)
        symbols = self.symbols[start:stop].tolist()
        values = encode_ticks(list(map(tick_prefix, symbols)), self.prices[start:stop], ts.tolist())
        return [(symbol.encode(), value, []) for symbol, value in zip(symbols, values, strict=True)]


async def replay(
    producer: AIOKafkaProducer,
    topic: str,
    stream: TickStream,
    *,
    rate: float | None = None,
    restamp: bool = False,
    progress: bool = False,
    chunk: int = 1000,
) -> int:
    """Produce every tick of ``stream`` to ``topic``; returns the number acknowledged.

    ``rate`` is ticks per second (None: as fast as possible). Ticks leave in slices, each
    released when the schedule says it is due, so the average rate is exact while each
    slice is one efficient batch.
    """
    publisher = BatchPublisher(producer)
    step = chunk if rate is None else max(1, min(chunk, int(rate / 100) or 1))
    started = time.monotonic()
    last_restamp = 0
    pending: list[Delivery] = []
    bar = tqdm(total=len(stream), unit="tick", disable=not progress, desc=f"replay -> {topic}")
    try:
        for start in range(0, len(stream), step):
            stop = min(start + step, len(stream))
            if rate is not None:
                due = started + start / rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            restamp_ms = None
            if restamp:
                restamp_ms = max(int(time.time() * 1000), last_restamp + 1)
                last_restamp = restamp_ms + (stop - start)
            pending.extend(await publisher.send(topic, stream.records(start, stop, restamp_ms)))
            bar.update(stop - start)
            if len(pending) > 64:
                await asyncio.gather(*(d.future for d in pending))
                pending.clear()
        await asyncio.gather(*(d.future for d in pending))
    finally:
        bar.close()
    return len(stream)
