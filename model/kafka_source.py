"""Training data from the ticks retained in a Kafka topic (``tickcast retrain --from-kafka``).

The daemon's own input stream becomes the training source. A consumer outside any group
(it commits nothing and never disturbs the daemon's group) reads every partition from its
beginning, or from ``since``, up to the end offsets taken when it starts, so a live topic
still gives a finite read. Ticks are decoded by the contract's rules (DESIGN.md: a JSON
object with a non-empty string ``symbol``, a finite positive ``price`` and an integer
epoch-millisecond ``ts``); anything else is skipped and counted. ``model`` never imports
``daemon``, so this is the training side's own small decoder.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from model.data import DataError, PriceSeries
from model.kafka_access import KafkaAccess
from model.tick_rules import (
    MAX_SYMBOL_LENGTH,
    MAX_TICK_BYTES,
    MAX_TS_MS,
    InvalidTickError,
    decode_tick_value,
)

logger = logging.getLogger(__name__)

P = TypeVar("P", bound=Hashable)  # a partition, as the caller names it


@dataclass
class KafkaTicks:
    """What one read of the topic found: per-symbol series and what was left out."""

    topic: str
    series: list[PriceSeries]
    records: int = 0
    invalid: Counter[str] = field(default_factory=Counter)  # reason -> records skipped
    duplicates: int = 0  # a (symbol, ts) seen before: the first one is kept
    too_short: dict[str, int] = field(default_factory=dict)  # symbol -> ticks, skipped
    since_ms: int | None = None
    in_range: int | None = None  # records written since since_ms (offsets, markers too)
    cut: bool = False  # starts moved later: in_range was over the read's limit
    cut_ms: int | None = None  # the record time of that cut (None: cut by offsets)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly counts for the retrain report and checkpoint meta."""
        return {
            "topic": self.topic,
            "records": self.records,
            "in_range": self.in_range,
            "cut_to_newest": self.cut,
            "cut_to_newest_since": _iso(self.cut_ms) if self.cut_ms is not None else None,
            "invalid": dict(self.invalid),
            "duplicates": self.duplicates,
            "symbols": {s.symbol: len(s) for s in self.series},
            "too_short": self.too_short,
            "since": _iso(self.since_ms) if self.since_ms is not None else None,
        }


def _iso(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC).isoformat()


def parse_duration(text: str) -> timedelta:
    """``7d``, ``1h``, ``30m``, ``90s``, ``1h30m`` or ISO 8601 (``P7D``): a positive duration.

    pandas' Timedelta parser does the work; this only insists on a unit and a positive
    result (pandas reads a bare number as nanoseconds: ``--since 1714521600000``, meant as
    epoch ms, would otherwise be 28 minutes back).
    """
    cleaned = text.strip()
    if re.fullmatch(r"[+-]?[\d.]+", cleaned):
        raise ValueError(f"a duration needs a unit: {text!r} (try 7d, 1h, 30m, 90s or P7D)")
    # A lone "d" for days is deprecated in pandas (Pandas4Warning): say "D" for it.
    cleaned = re.sub(r"(?<=\d)d(?![a-z])", "D", cleaned)
    try:
        value = pd.Timedelta(cleaned)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a duration: {text!r} (try 7d, 1h, 30m, 90s or P7D)") from exc
    if pd.isna(value) or value <= pd.Timedelta(0):
        raise ValueError(f"duration must be positive, got {text!r}")
    return timedelta(microseconds=value.value // 1000)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def epoch_ms(moment: datetime) -> int:
    """An aware datetime in epoch ms, in integer arithmetic (a float timestamp times 1000
    can land a millisecond early)."""
    return (moment - _EPOCH) // _MS


def parse_since(text: str, now: datetime | None = None) -> int:
    """``--since``: a duration back from ``now`` (``7d``) or an ISO time; epoch ms (UTC).

    An ISO time without a zone is taken as UTC.
    """
    try:
        return epoch_ms((now or datetime.now(UTC)) - parse_duration(text))
    except ValueError:
        pass
    try:
        stamp = pd.Timestamp(text.strip())
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"--since wants a duration (7d, 12h) or an ISO time (2024-05-01T00:00Z), got {text!r}"
        ) from exc
    if pd.isna(stamp):
        raise ValueError(f"--since: not a time: {text!r}")
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize("UTC")
    return int(stamp.value // 1_000_000)  # .value: nanoseconds since the epoch, UTC


def decode_tick(
    value: bytes | None,
    max_tick_bytes: int = MAX_TICK_BYTES,
    max_symbol_length: int = MAX_SYMBOL_LENGTH,
) -> tuple[str, float, int] | str:
    """(symbol, price, ts) of one record value, or the reason it cannot be used: the
    daemon's rules (:mod:`model.tick_rules`) at the daemon's limits."""
    if not value:
        return "empty"
    if len(value) > max_tick_bytes:
        return "oversized"
    try:
        return decode_tick_value(value, max_symbol_length)
    except InvalidTickError as invalid:
        return invalid.reason


class TickColumns:
    """Decoded ticks as columns, filled one fetch at a time.

    Each tick is kept as a symbol code, a ts and a price (20 bytes) rather than as Python
    objects (~200 bytes), so a long read fits the retrain job's memory; the record values
    of a fetch are dropped once decoded.
    """

    def __init__(
        self, max_tick_bytes: int = MAX_TICK_BYTES, max_symbol_length: int = MAX_SYMBOL_LENGTH
    ) -> None:
        self.limits = (max_tick_bytes, max_symbol_length)  # TICKCAST_MAX_*, as the daemon's
        self.records = 0
        self.invalid: Counter[str] = Counter()
        self._codes: dict[str, int] = {}  # symbol -> code, in order of first appearance
        self._columns: tuple[list[np.ndarray], ...] = ([], [], [])  # codes, times, prices

    def add(self, values: Iterable[bytes | None]) -> None:
        """Decode one batch of record values (in consumption order)."""
        codes: list[int] = []
        times: list[int] = []
        prices: list[float] = []
        for value in values:
            self.records += 1
            decoded = decode_tick(value, *self.limits)
            if isinstance(decoded, str):
                self.invalid[decoded] += 1
                continue
            symbol, price, ts = decoded
            codes.append(self._codes.setdefault(symbol, len(self._codes)))
            times.append(ts)
            prices.append(price)
        if codes:
            self._columns[0].append(np.array(codes, dtype=np.int32))
            self._columns[1].append(np.array(times, dtype=np.int64))
            self._columns[2].append(np.array(prices, dtype=np.float64))

    def to_ticks(self, *, topic: str, min_ticks: int, since_ms: int | None = None) -> KafkaTicks:
        """One sorted series per symbol (see :func:`build_series`); empties the columns."""
        result = KafkaTicks(
            topic=topic, series=[], records=self.records, invalid=self.invalid, since_ms=since_ms
        )
        codes, times, prices = (
            np.concatenate(chunks) if chunks else np.empty(0, dtype)
            for chunks, dtype in zip(self._columns, (np.int32, np.int64, np.float64), strict=True)
        )
        self._columns = ([], [], [])
        # Stable: among equal (symbol, ts) the first one consumed comes first and is kept.
        order = np.lexsort((times, codes))
        codes, times, prices = codes[order], times[order], prices[order]
        del order
        repeated = np.zeros(len(codes), dtype=bool)
        repeated[1:] = (codes[1:] == codes[:-1]) & (times[1:] == times[:-1])
        result.duplicates = int(repeated.sum())
        if result.duplicates:
            kept = ~repeated
            codes, times, prices = codes[kept], times[kept], prices[kept]
        bounds = np.searchsorted(codes, np.arange(len(self._codes) + 1))
        source = f"kafka:{topic}"
        for symbol in sorted(self._codes):
            code = self._codes[symbol]
            start, stop = int(bounds[code]), int(bounds[code + 1])
            if stop - start < min_ticks:
                result.too_short[symbol] = stop - start
                logger.info(
                    "skipping %s: %d ticks in %s, fewer than the %d needed to train",
                    symbol,
                    stop - start,
                    topic,
                    min_ticks,
                )
                continue
            result.series.append(PriceSeries(symbol, source, times[start:stop], prices[start:stop]))
        if result.invalid:
            logger.warning(
                "%s: skipped %d invalid ticks (%s)",
                topic,
                sum(result.invalid.values()),
                ", ".join(f"{reason}: {n}" for reason, n in sorted(result.invalid.items())),
            )
        return result


def build_series(
    values: Iterable[bytes | None], *, topic: str, min_ticks: int, since_ms: int | None = None
) -> KafkaTicks:
    """Decode record values (in consumption order) into one sorted series per symbol.

    Invalid ticks are counted by reason and skipped; a repeated (symbol, ts) keeps its
    first occurrence (a redelivered or replayed tick); each symbol is sorted by ts; a
    symbol with fewer than ``min_ticks`` ticks is left out with a log line.
    """
    columns = TickColumns()
    columns.add(values)
    return columns.to_ticks(topic=topic, min_ticks=min_ticks, since_ms=since_ms)


async def newest_start(
    count_since: Callable[[int], Awaitable[int]], low_ms: int, high_ms: int, limit: int
) -> int:
    """The earliest time in [low_ms, high_ms] since which at most ``limit`` records were
    written, by bisection. ``count_since`` must not increase with its argument and must
    be at most ``limit`` at ``high_ms``."""
    while low_ms < high_ms:
        middle = (low_ms + high_ms) // 2
        if await count_since(middle) <= limit:
            high_ms = middle
        else:
            low_ms = middle + 1
    return low_ms


def offsets_between(starts: Mapping[P, int], ends: Mapping[P, int]) -> int:
    """Offsets from each partition's start to its end, summed: records, transaction
    markers and compacted gaps alike, so an upper bound on the records there."""
    return sum(ends[p] - starts[p] for p in starts)


async def newest_starts(
    starts: Mapping[P, int],
    ends: Mapping[P, int],
    offsets_at: Callable[[int], Awaitable[Mapping[P, int]]],
    *,
    low_ms: int,
    limit: int,
) -> tuple[dict[P, int], int | None]:
    """Later start offsets per partition that leave at most ``limit`` of the newest records
    in [starts, ends), and the record time they were cut at.

    ``offsets_at(t)`` is each partition's first offset with a record time at or after
    ``t`` (the broker's offsets by time). Every partition is cut at the same time, the
    earliest that leaves at most ``limit``. Record times out of order can defeat that: one
    record stamped ahead of the others (a producer's clock) keeps the count above the limit
    until its own time, and then almost nothing is left. When the time cut keeps fewer than
    half of ``limit`` (or more than it), each partition instead keeps its share of
    ``limit`` by offset, and the cut time is None.
    """

    async def starts_from(moment_ms: int) -> dict[P, int]:
        found = await offsets_at(moment_ms)
        return {p: min(max(found[p], starts[p]), ends[p]) for p in starts}

    async def count_since(moment_ms: int) -> int:
        return offsets_between(await starts_from(moment_ms), ends)

    cut_ms = await newest_start(count_since, low_ms, MAX_TS_MS, limit)
    cut = await starts_from(cut_ms)
    if limit // 2 <= offsets_between(cut, ends) <= limit:
        return cut, cut_ms
    total = offsets_between(starts, ends)
    return {
        p: max(starts[p], ends[p] - limit * (ends[p] - starts[p]) // total) for p in starts
    }, None


@dataclass(frozen=True)
class TopicRead:
    """Where a read of the topic began: ``cut`` is set when ``max_records`` moved the
    starts later than ``since`` (the topic held ``in_range`` records from there), at the
    record time ``cut_ms``, or by offsets when that is None."""

    in_range: int
    cut: bool = False
    cut_ms: int | None = None


async def read_topic(
    bootstrap_servers: str,
    topic: str,
    into: TickColumns,
    *,
    since_ms: int | None = None,
    max_records: int | None = None,
    consumer_kwargs: dict[str, Any] | None = None,
    timeout_s: float = 60.0,
) -> TopicRead:
    """Decode every record of ``topic`` from the beginning (or ``since_ms``, by record
    timestamp) up to the end offsets at the start into ``into``, one fetch at a time.

    With ``max_records``, only the newest records are read: if more were written since
    ``since_ms``, every partition starts at the same later time instead, the earliest one
    that leaves at most ``max_records`` (found by asking the broker for offsets by time),
    or each partition its share by offset when record times are out of order
    (:func:`newest_starts`). ``timeout_s`` bounds each wait without progress, not the
    whole read: a long topic takes as long as it takes to read.
    """
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
        request_timeout_ms=int(timeout_s * 1000),
        **(consumer_kwargs or {}),
    )
    started = time.monotonic()
    try:
        await consumer.start()  # inside the try: a failed start (wrong password) still stops
        if topic not in await consumer.topics():
            raise DataError(f"topic {topic!r} does not exist on {bootstrap_servers}")
        # A group-less consumer tracks no topic's metadata until told to; aiokafka has no
        # public call for that, so ask its client to track this one and wait for it.
        await consumer._client.add_topic(topic)
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise DataError(f"no partition metadata for {topic!r} on {bootstrap_servers}")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)

        async def offsets_at(moment_ms: int) -> dict[TopicPartition, int]:
            found = await consumer.offsets_for_times(dict.fromkeys(tps, moment_ms))
            # No record at or after the moment: nothing of this partition is wanted; and
            # never past the end taken at the start (a live topic moves on).
            return {
                tp: min(hit.offset, ends[tp]) if (hit := found.get(tp)) else ends[tp] for tp in tps
            }

        if since_ms is None:
            starts = dict(await consumer.beginning_offsets(tps))
        else:
            starts = await offsets_at(since_ms)
        # Offsets, not records (see offsets_between), so a cut is conservative.
        read = TopicRead(in_range=offsets_between(starts, ends))
        if max_records is not None and read.in_range > max_records:
            starts, cut_ms = await newest_starts(
                starts, ends, offsets_at, low_ms=since_ms or 0, limit=max_records
            )
            read = TopicRead(in_range=read.in_range, cut=True, cut_ms=cut_ms)
            logger.warning(
                "%s holds %d records%s, more than the %d allowed (--max-ticks): "
                "reading the newest %d, %s",
                topic,
                read.in_range,
                f" since {_iso(since_ms)}" if since_ms is not None else "",
                max_records,
                offsets_between(starts, ends),
                f"written since {_iso(cut_ms)}"
                if cut_ms is not None
                else "each partition's share by offset (record times out of order)",
            )
        # Explicit seeks, checked: a fresh assignment also triggers aiokafka's own offset
        # reset in the background, which can land after a seek_to_beginning() and move
        # the position to the end (seen as a second read in one process finding nothing).
        for tp in tps:
            for _ in range(10):
                consumer.seek(tp, starts[tp])
                if await consumer.position(tp) == starts[tp]:
                    break
            else:
                raise DataError(f"cannot seek {tp.topic}[{tp.partition}] to {starts[tp]}")
        todo = {tp: end for tp, end in ends.items() if starts[tp] < end}
        deadline = time.monotonic() + timeout_s
        while todo:
            if time.monotonic() > deadline:
                raise DataError(
                    f"reading {topic}: nothing new for {timeout_s:.0f}s with partitions "
                    f"{sorted(tp.partition for tp in todo)} unfinished"
                )
            fetched = await consumer.getmany(*todo, timeout_ms=500, max_records=50_000)
            if fetched:
                deadline = time.monotonic() + timeout_s
            for tp, batch in fetched.items():
                end = todo.get(tp)
                if end is not None:
                    into.add(r.value for r in batch if starts[tp] <= r.offset < end)
            for tp in list(todo):
                # Positions pass transaction markers and compacted gaps too.
                if await consumer.position(tp) >= todo[tp]:
                    del todo[tp]
    finally:
        await consumer.stop()
    logger.info(
        "read %d records of %s in %.2fs%s",
        into.records,
        topic,
        time.monotonic() - started,
        f" (since {_iso(since_ms)})" if since_ms is not None else "",
    )
    return read


def load_kafka_series(
    access: KafkaAccess,
    *,
    min_ticks: int,
    since_ms: int | None = None,
    max_records: int | None = None,
    timeout_s: float = 60.0,
) -> KafkaTicks:
    """Read ``access.input_topic`` and build the training series (blocking; runs its own
    event loop), connecting with ``access``'s security settings. ``max_records`` keeps
    the read to the newest records (see :func:`read_topic`)."""
    bootstrap, topic = access.bootstrap_servers, access.input_topic
    columns = TickColumns(access.max_tick_bytes, access.max_symbol_length)
    try:
        read = asyncio.run(
            read_topic(
                bootstrap,
                topic,
                columns,
                since_ms=since_ms,
                max_records=max_records,
                consumer_kwargs=access.client_kwargs(),
                timeout_s=timeout_s,
            )
        )
    except DataError:
        raise
    except Exception as exc:  # KafkaError, connection refused, ...: a clear message, exit 2
        reason = f"{type(exc).__name__}: {exc}"
        raise DataError(f"cannot read {topic} from {bootstrap}: {reason}") from exc
    result = columns.to_ticks(topic=topic, min_ticks=min_ticks, since_ms=since_ms)
    result.in_range, result.cut, result.cut_ms = read.in_range, read.cut, read.cut_ms
    if not result.series:
        cut = f", the newest of {read.in_range}" if read.cut else ""
        raise DataError(
            f"{topic} holds no symbol with at least {min_ticks} valid ticks "
            f"({result.records} records read{cut}, {sum(result.invalid.values())} invalid, "
            f"too short: {result.too_short or 'none'})"
        )
    return result
