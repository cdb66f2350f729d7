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
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import orjson
import pandas as pd

from model.data import DataError, PriceSeries
from model.kafka_access import KafkaAccess
from model.tick_rules import MAX_TICK_BYTES, InvalidTickError, validate_tick

logger = logging.getLogger(__name__)


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

    def summary(self) -> dict[str, Any]:
        """JSON-friendly counts for the retrain report and checkpoint meta."""
        return {
            "topic": self.topic,
            "records": self.records,
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


def decode_tick(value: bytes | None) -> tuple[str, float, int] | str:
    """(symbol, price, ts) of one record value, or the reason it cannot be used: the
    daemon's rules (:mod:`model.tick_rules`) at their default limits."""
    if not value:
        return "empty"
    if len(value) > MAX_TICK_BYTES:
        return "oversized"
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        return "not_json"
    try:
        return validate_tick(obj)
    except InvalidTickError as invalid:
        return invalid.reason


def build_series(
    values: Iterable[bytes | None], *, topic: str, min_ticks: int, since_ms: int | None = None
) -> KafkaTicks:
    """Decode record values (in consumption order) into one sorted series per symbol.

    Invalid ticks are counted by reason and skipped; a repeated (symbol, ts) keeps its
    first occurrence (a redelivered or replayed tick); each symbol is sorted by ts; a
    symbol with fewer than ``min_ticks`` ticks is left out with a log line.
    """
    result = KafkaTicks(topic=topic, series=[], since_ms=since_ms)
    ticks: dict[str, dict[int, float]] = {}
    for value in values:
        result.records += 1
        decoded = decode_tick(value)
        if isinstance(decoded, str):
            result.invalid[decoded] += 1
            continue
        symbol, price, ts = decoded
        prices = ticks.setdefault(symbol, {})
        if ts in prices:
            result.duplicates += 1
            continue
        prices[ts] = price
    source = f"kafka:{topic}"
    for symbol in sorted(ticks):
        by_ts = ticks[symbol]
        if len(by_ts) < min_ticks:
            result.too_short[symbol] = len(by_ts)
            logger.info(
                "skipping %s: %d ticks in %s, fewer than the %d needed to train",
                symbol,
                len(by_ts),
                topic,
                min_ticks,
            )
            continue
        times = np.fromiter(sorted(by_ts), dtype=np.int64, count=len(by_ts))
        values_by_time = (by_ts[t] for t in times.tolist())
        prices_sorted = np.fromiter(values_by_time, dtype=np.float64, count=len(times))
        result.series.append(PriceSeries(symbol, source, times, prices_sorted))
    if result.invalid:
        logger.warning(
            "%s: skipped %d invalid ticks (%s)",
            topic,
            sum(result.invalid.values()),
            ", ".join(f"{reason}: {n}" for reason, n in sorted(result.invalid.items())),
        )
    return result


async def read_topic_values(
    bootstrap_servers: str,
    topic: str,
    *,
    since_ms: int | None = None,
    consumer_kwargs: dict[str, Any] | None = None,
    timeout_s: float = 60.0,
) -> list[bytes | None]:
    """Every record value of ``topic`` from the beginning (or ``since_ms``, by record
    timestamp) up to the end offsets at the start, partition by partition in offset order.

    ``timeout_s`` bounds each wait without progress, not the whole read: a long topic
    takes as long as it takes to read.
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
    values: list[bytes | None] = []
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
        starts: dict[TopicPartition, int] = await consumer.beginning_offsets(tps)
        if since_ms is not None:
            found = await consumer.offsets_for_times(dict.fromkeys(tps, since_ms))
            for tp in tps:
                hit = found.get(tp)
                # No record at or after since_ms: nothing of this partition is wanted.
                starts[tp] = hit.offset if hit is not None else ends[tp]
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
                    values.extend(r.value for r in batch if starts[tp] <= r.offset < end)
            for tp in list(todo):
                # Positions pass transaction markers and compacted gaps too.
                if await consumer.position(tp) >= todo[tp]:
                    del todo[tp]
    finally:
        await consumer.stop()
    logger.info(
        "read %d records of %s in %.2fs%s",
        len(values),
        topic,
        time.monotonic() - started,
        f" (since {_iso(since_ms)})" if since_ms is not None else "",
    )
    return values


def load_kafka_series(
    access: KafkaAccess,
    *,
    min_ticks: int,
    since_ms: int | None = None,
    timeout_s: float = 60.0,
) -> KafkaTicks:
    """Read ``access.input_topic`` and build the training series (blocking; runs its own
    event loop), connecting with ``access``'s security settings."""
    bootstrap, topic = access.bootstrap_servers, access.input_topic
    try:
        values = asyncio.run(
            read_topic_values(
                bootstrap,
                topic,
                since_ms=since_ms,
                consumer_kwargs=access.client_kwargs(),
                timeout_s=timeout_s,
            )
        )
    except DataError:
        raise
    except Exception as exc:  # KafkaError, connection refused, ...: a clear message, exit 2
        reason = f"{type(exc).__name__}: {exc}"
        raise DataError(f"cannot read {topic} from {bootstrap}: {reason}") from exc
    result = build_series(values, topic=topic, min_ticks=min_ticks, since_ms=since_ms)
    if not result.series:
        raise DataError(
            f"{topic} holds no symbol with at least {min_ticks} valid ticks "
            f"({result.records} records read, {sum(result.invalid.values())} invalid, "
            f"too short: {result.too_short or 'none'})"
        )
    return result
