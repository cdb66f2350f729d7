"""``tickcast replay``: produce real price series as ticks.

Several series are interleaved by event time (a k-way merge), keyed by symbol, at a fixed
rate or as fast as the broker takes them. ``restamp`` replaces historic event times with
the wall clock (strictly increasing per symbol), for live demos and latency measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
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
            if limit < 0:
                raise ValueError(f"limit must be at least 0, got {limit}")
            order = order[:limit]
        return TickStream(symbols[order], prices[order], ts[order])

    def split(self, at: int) -> tuple[TickStream, TickStream]:
        """The first ``at`` ticks, and the rest."""
        return (
            TickStream(self.symbols[:at], self.prices[:at], self.ts[:at]),
            TickStream(self.symbols[at:], self.prices[at:], self.ts[at:]),
        )

    def records(self, start: int, stop: int, ts: np.ndarray | None = None) -> list[OutRecord]:
        """Tick records for rows [start, stop); ``ts`` replaces their event times."""
        if ts is None:
            ts = self.ts[start:stop]
        elif len(ts) != stop - start:
            raise ValueError(f"{len(ts)} event times for {stop - start} ticks")
        symbols = self.symbols[start:stop].tolist()
        values = encode_ticks(list(map(tick_prefix, symbols)), self.prices[start:stop], ts.tolist())
        return [(symbol.encode(), value, []) for symbol, value in zip(symbols, values, strict=True)]


class Restamper:
    """Wall-clock event times, strictly increasing per symbol.

    Each tick gets ``max(now_ms, that symbol's last stamp + 1)``: the clock itself unless
    its symbol already ticked in this millisecond (the daemon drops a tick that is not
    newer than its symbol's last one). So stamps run ahead of the clock only when one
    symbol ticks more than 1,000 times a second, and then by no more than needed.
    """

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def stamp(self, symbols: np.ndarray, now_ms: int) -> np.ndarray:
        """Event times (int64 epoch ms) for ``symbols``, in order, stamped at ``now_ms``."""
        n = len(symbols)
        if n == 0:
            return np.empty(0, dtype=np.int64)
        names, inverse = np.unique(np.asarray(symbols, dtype=object), return_inverse=True)
        inverse = inverse.reshape(-1)
        names_list = names.tolist()
        last = np.fromiter(
            (self._last.get(name, now_ms - 1) for name in names_list),
            dtype=np.int64,
            count=len(names_list),
        )
        base = np.maximum(np.int64(now_ms), last + 1)
        # Rank of each tick among its symbol's ticks in this batch: 0, 1, 2, ...
        counts = np.bincount(inverse, minlength=len(names_list))
        by_symbol = np.argsort(inverse, kind="stable")
        rank = np.empty(n, dtype=np.int64)
        rank[by_symbol] = np.arange(n, dtype=np.int64) - np.repeat(
            np.cumsum(counts) - counts, counts
        )
        self._last.update(zip(names_list, (base + counts - 1).tolist(), strict=True))
        stamps: np.ndarray = base[inverse] + rank
        return stamps


class ReplayError(Exception):
    """Producing failed part-way; ``acknowledged`` ticks had been acknowledged by then."""

    def __init__(self, cause: Exception, acknowledged: int) -> None:
        super().__init__(f"{cause} ({acknowledged} ticks acknowledged)")
        self.cause = cause
        self.acknowledged = acknowledged


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
    restamper = Restamper() if restamp else None
    pending: list[Delivery] = []
    acknowledged = 0

    async def settle() -> None:
        """Wait for every pending delivery; count what was acknowledged; raise the first
        failure (only once all have settled, so none is left unobserved)."""
        nonlocal acknowledged
        results = await asyncio.gather(*(d.future for d in pending), return_exceptions=True)
        failure: BaseException | None = None
        for delivery, result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                failure = failure or result
            else:
                acknowledged += len(delivery.records)
        pending.clear()
        if failure is not None:
            raise failure

    bar = tqdm(total=len(stream), unit="tick", disable=not progress, desc=f"replay -> {topic}")
    try:
        for start in range(0, len(stream), step):
            stop = min(start + step, len(stream))
            if rate is not None:
                due = started + start / rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            stamps = None
            if restamper is not None:
                stamps = restamper.stamp(stream.symbols[start:stop], int(time.time() * 1000))
            pending.extend(await publisher.send(topic, stream.records(start, stop, stamps)))
            bar.update(stop - start)
            if len(pending) > 64:
                await settle()
        await settle()
    except KafkaError as exc:
        if pending:  # a send failed: count what the broker took before it
            with contextlib.suppress(KafkaError):
                await settle()
        raise ReplayError(exc, acknowledged) from exc
    finally:
        bar.close()
    return acknowledged
