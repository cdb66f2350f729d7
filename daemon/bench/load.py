"""The load generator and the measuring consumer: real prices in as ticks stamped with the
wall clock, predictions out with the time each was read."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from daemon.bench.plan import REAL_SERIES
from daemon.ticks import encode_ticks, tick_prefix


@dataclass(frozen=True)
class TickSource:
    """Real prices for S symbols; tick k belongs to symbol k % S (round robin)."""

    names: list[str]
    key_bytes: list[bytes]
    prices: np.ndarray  # [S, ticks_per_symbol] float64
    note: str
    # Each symbol's tick JSON up to its price, encoded once: b'{"symbol":"QQQ.0","price":'
    value_prefixes: list[bytes]

    @staticmethod
    def build(n_symbols: int, ticks_per_symbol: int) -> TickSource:
        from model.data import load_many

        series = load_many(list(REAL_SERIES))
        names: list[str] = []
        rows = np.empty((n_symbols, ticks_per_symbol))
        steps = np.arange(ticks_per_symbol)
        for i in range(n_symbols):
            base = series[i % len(series)]
            replica = i // len(series)
            names.append(f"{base.symbol}.{replica}")
            offset = (replica * 97) % len(base.prices)
            rows[i] = base.prices[(offset + steps) % len(base.prices)]
        note = (
            f"{n_symbols} symbols replicate {len(series)} real series "
            f"({', '.join(s.symbol for s in series)}); replica r starts r*97 rows later "
            "and cycles; ts = wall clock at produce time"
        )
        return TickSource.of(names, rows, note)

    @staticmethod
    def of(names: list[str], prices: np.ndarray, note: str) -> TickSource:
        prefixes = [tick_prefix(n) for n in names]
        return TickSource(names, [n.encode() for n in names], prices, note, prefixes)

    @property
    def n_symbols(self) -> int:
        return len(self.names)


class TickWriter:
    """Produces ticks k = start.. of a :class:`TickSource`, stamped with the wall clock."""

    def __init__(self, source: TickSource, producer: Any, topic: str) -> None:
        from daemon.publisher import BatchPublisher

        self.source = source
        self.topic = topic
        self.publisher = BatchPublisher(producer)
        self.next_tick = 0
        self.last_step_ts = 0
        self.pending: list[Any] = []

    def _records(self, n: int, due_ms: int | None = None) -> list[Any]:
        s = self.source
        k = np.arange(self.next_tick, self.next_tick + n)
        sym, step = k % s.n_symbols, k // s.n_symbols
        if step[-1] >= s.prices.shape[1]:
            raise RuntimeError("the tick source ran out of prices; build it larger")
        # A symbol's ts must grow: one ms per round robin at least, else the time the ticks
        # were due (the wall clock for a backlog).
        stamp = due_ms if due_ms is not None else int(time.time() * 1000)
        first = max(stamp, self.last_step_ts + 1)
        ts = first + (step - step[0])
        self.last_step_ts = int(ts[-1])
        self.next_tick += n
        # The load generator shares the 2 cores with the daemon it measures: batched.
        symbols = sym.tolist()
        prefixes, keys = s.value_prefixes, s.key_bytes
        values = encode_ticks([prefixes[i] for i in symbols], s.prices[sym, step], ts.tolist())
        return [(keys[i], value, []) for i, value in zip(symbols, values, strict=True)]

    async def write(self, n: int, due_ms: int | None = None) -> None:
        self.pending.extend(await self.publisher.send(self.topic, self._records(n, due_ms)))
        if len(self.pending) > 64:
            await self.flush()

    async def flush(self) -> None:
        await asyncio.gather(*(d.future for d in self.pending))
        self.pending.clear()

    async def write_backlog(self, n: int, slice_size: int = 2000) -> None:
        for start in range(0, n, slice_size):
            await self.write(min(slice_size, n - start))
        await self.flush()

    async def write_at_rate(self, rate: float, seconds: float) -> tuple[int, float]:
        """Offered load: ``rate`` ticks/s for ``seconds``; returns (ticks, real seconds).

        Each tick's ts is when the schedule had it due, not when it left: a generator
        running late (it shares the cores) then shows in the latency, instead of being
        left out of it (coordinated omission)."""
        step = max(1, min(2000, int(rate / 200)))
        started = time.monotonic()
        started_ms = time.time() * 1000.0
        sent = 0
        while True:
            elapsed = time.monotonic() - started
            if elapsed >= seconds:
                break
            due = int(rate * elapsed) + step
            if sent >= due:
                await asyncio.sleep(step / rate)
                continue
            await self.write(due - sent, due_ms=int(started_ms + 1000.0 * sent / rate))
            sent = due
        await self.flush()
        return sent, time.monotonic() - started


@contextlib.asynccontextmanager
async def producer_for(bootstrap: str, idempotent: bool = True) -> AsyncIterator[Any]:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=idempotent,
        # Short, but not 0: at 18,000 ticks/s linger 0 took the bench from 0.32 to 0.65
        # cores and the broker from 0.25 to 0.48 (more, smaller produce requests).
        linger_ms=2,
        max_batch_size=512 * 1024,
    )
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


class _PredictionTs(msgspec.Struct):
    ts: int


_decode_prediction_ts = msgspec.json.Decoder(_PredictionTs).decode


def _prediction_ts(record: Any) -> int:
    """A prediction's ts, parsed in C without building the rest of it (the reader shares
    the cores with the daemon it measures: 0.23 us per record, 0.52 us via a dict)."""
    return _decode_prediction_ts(record.value).ts


class PredictionReader:
    """Reads the output topic from the start; keeps (received at, ts, symbol id) per record."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.received: list[np.ndarray] = []  # float64 wall time per record
        self.ts: list[np.ndarray] = []
        self.produced_ms: list[np.ndarray] = []  # each record's Kafka (create) timestamp
        self.keys: list[np.ndarray] = []  # bytes arrays: no Python object per record
        self.count = 0
        self._task: asyncio.Task[None] | None = None
        self._consumer: Any = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer

        from daemon.raw_records import raw_value

        self._consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_bytes=16 * 1024 * 1024,
            max_partition_fetch_bytes=8 * 1024 * 1024,
            # Like the daemon: fuller fetches, so the reader's CPU does not crowd it out.
            fetch_min_bytes=64 * 1024,
            fetch_max_wait_ms=5,
            value_deserializer=raw_value,  # records as fetched: no ConsumerRecord each
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._consumer is not None
        while not self._stop.is_set():
            fetched = await self._consumer.getmany(timeout_ms=50, max_records=20_000)
            now = time.time()
            for records in fetched.values():
                if not records:
                    continue
                ts = np.fromiter(map(_prediction_ts, records), np.int64, len(records))
                self.ts.append(ts)
                self.received.append(np.full(len(records), now))
                self.produced_ms.append(
                    np.fromiter((r.timestamp for r in records), np.int64, len(records))
                )
                self.keys.append(np.array([r.key for r in records], dtype=np.bytes_))
                self.count += len(records)

    async def wait_for(self, total: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.count < total:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def read_to_end(self, timeout_s: float) -> bool:
        """Wait until every record now in the topic has been read.

        Offsets count records here: the bench's output topics are fresh and written
        without transactions, so there are no control records between them.
        """
        from aiokafka import TopicPartition

        assert self._consumer is not None
        await self._consumer.topics()  # refreshes metadata: partitions_for_topic is cached
        partitions = self._consumer.partitions_for_topic(self.topic) or set()
        ends = await self._consumer.end_offsets([TopicPartition(self.topic, p) for p in partitions])
        return await self.wait_for(sum(ends.values()), timeout_s)

    def first_produced_at(self) -> float | None:
        """Wall time (s) at which the earliest record read so far was produced."""
        if not self.produced_ms:
            return None
        return float(min(a.min() for a in self.produced_ms if len(a))) / 1000.0

    def produced_at(self) -> np.ndarray:
        """Each record's Kafka timestamp in seconds, in reading order: the daemon's producer
        stamps a prediction when it appends it to a batch."""
        if not self.produced_ms:
            return np.empty(0)
        return np.concatenate(self.produced_ms) / 1000.0

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.ts:
            return np.empty(0), np.empty(0, np.int64)
        return np.concatenate(self.received), np.concatenate(self.ts)

    def distinct(self) -> int:
        """Distinct (symbol, ts) predictions: redeliveries would repeat a pair."""
        _, ts = self.arrays()
        if not len(ts):
            return 0
        _, symbol_ids = np.unique(np.concatenate(self.keys), return_inverse=True)
        return len(np.unique(np.stack([symbol_ids.astype(np.int64), ts], axis=1), axis=0))

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        if self._consumer is not None:
            await self._consumer.stop()


def stage_summary(stage: str, seconds: np.ndarray) -> dict[str, float]:
    """p50 and p99 in ms of one stage of the latency, as ``<stage>_p50_ms`` and so on."""
    if not len(seconds):
        return {f"{stage}_p50_ms": float("nan"), f"{stage}_p99_ms": float("nan")}
    p50, p99 = np.percentile(seconds, [50, 99]) * 1000.0
    return {f"{stage}_p50_ms": round(float(p50), 2), f"{stage}_p99_ms": round(float(p99), 2)}


def latency_summary(seconds: np.ndarray) -> dict[str, float]:
    if not len(seconds):
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan"), "n": 0}
    p50, p99 = np.percentile(seconds, [50, 99]) * 1000.0
    return {
        "p50_ms": round(float(p50), 2),
        "p99_ms": round(float(p99), 2),
        "max_ms": round(float(seconds.max() * 1000.0), 2),
        "n": len(seconds),
    }
