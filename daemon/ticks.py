"""Decoding and validating ticks from the input topic.

A tick's value is a UTF-8 JSON object ``{"symbol": "QQQ", "price": 312.45, "ts": 1704205800000}``;
unknown extra fields are ignored and the value's symbol is authoritative (the key is only
a partitioning hint). Anything else becomes a :class:`BadTick` with a reason, bound for
the dead-letter topic: a bad tick never raises and never blocks its partition.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import orjson

from model.tick_rules import (
    MAX_PRICE,
    MAX_TS_MS,
    MIN_PRICE,
    InvalidTickError,
    decode_tick_value,
    parse_schema_tick,
)


class RawRecord(Protocol):
    """What we need of a fetched record: an aiokafka ``ConsumerRecord``, or the record
    object itself on the raw path (:mod:`daemon.raw_records`), which has no partition."""

    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


@dataclass(frozen=True)
class UnreadableRecord:
    """Stands in for a record the Kafka client could not parse: only its offset is known."""

    offset: int
    key: bytes | None = None
    value: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class BadTick:
    """A record that cannot be used, with the reason it goes to the dead-letter topic."""

    record: RawRecord
    partition: int
    reason: str  # short, bounded vocabulary: used as a metric label
    detail: str  # human-readable, goes into a header


@dataclass
class DecodedTicks:
    """The valid ticks of one fetch, as parallel arrays in consumption order."""

    symbols: list[str] = field(default_factory=list)
    prices: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    ts: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    partitions: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    offsets: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))

    def __len__(self) -> int:
        return len(self.symbols)


# Every reason a tick is dead-lettered for (the tickcast_bad_ticks_total label, created at
# 0 for each so the first of a kind shows in rate()); "unreadable" is a record batch the
# client could not parse (the service dead-letters its offsets).
BAD_TICK_REASONS = (
    "unreadable",
    "empty",
    "oversized",
    "not_utf8",
    "not_json",
    "not_object",
    "missing_field",
    "bad_symbol",
    "bad_price",
    "bad_ts",
)


def decode_ticks(
    records: Sequence[RawRecord],
    partitions: np.ndarray,
    *,
    max_tick_bytes: int,
    max_symbol_length: int,
) -> tuple[DecodedTicks, list[BadTick]]:
    """Split records into valid ticks (as arrays) and bad ticks (with reasons);
    ``partitions[i]`` is the input partition of ``records[i]``.

    A fetch of only good ticks (the usual case) is parsed against a typed schema in C
    (msgspec) and checked column by column with numpy; any doubt sends the whole fetch
    through the record-by-record path, which names each bad tick's reason. Both accept
    exactly the same records (that path tries the same schema first), so whether a tick
    is scored never depends on the other records of its fetch.
    """
    clean = _decode_clean(records, partitions, max_tick_bytes, max_symbol_length)
    if clean is not None:
        return clean, []
    return decode_one_by_one(
        records, partitions, max_tick_bytes=max_tick_bytes, max_symbol_length=max_symbol_length
    )


_SYMBOL = operator.attrgetter("symbol")
_PRICE = operator.attrgetter("price")
_TS = operator.attrgetter("ts")
_VALUE = operator.attrgetter("value")
_OFFSET = operator.attrgetter("offset")


def _decode_clean(
    records: Sequence[RawRecord],
    partitions: np.ndarray,
    max_tick_bytes: int,
    max_symbol_length: int,
) -> DecodedTicks | None:
    """The fetch as arrays when every record is a good tick; None at the first doubt."""
    n = len(records)
    try:
        values = list(map(_VALUE, records))
        sizes = np.fromiter(map(len, values), np.int64, n)
        if n == 0 or sizes.min() == 0 or sizes.max() > max_tick_bytes:
            return None
        ticks = list(map(parse_schema_tick, values))
        # msgspec skips unknown fields without checking their UTF-8; one C pass does.
        b"".join(values).decode("utf-8")
        symbols = list(map(_SYMBOL, ticks))
        lengths = np.fromiter(map(len, symbols), np.int64, n)
        if lengths.min() == 0 or lengths.max() > max_symbol_length:
            return None
        if not "".join(symbols).isprintable():  # one C pass; same answer as per symbol
            return None
        prices = np.fromiter(map(_PRICE, ticks), np.float64, n)
        ts = np.fromiter(map(_TS, ticks), np.int64, n)  # OverflowError beyond int64
    except Exception:  # DecodeError, UnicodeDecodeError, TypeError, OverflowError;
        return None  # RecursionError (a deeply nested extra field): the per-record path
    if not ((prices >= MIN_PRICE).all() and (prices <= MAX_PRICE).all()):  # NaN fails too
        return None
    if not ((ts > 0).all() and (ts < MAX_TS_MS).all()):
        return None
    return DecodedTicks(
        symbols=symbols,
        prices=prices,
        ts=ts,
        partitions=np.asarray(partitions, dtype=np.int32),
        offsets=np.fromiter(map(_OFFSET, records), np.int64, n),
    )


def decode_one_by_one(
    records: Sequence[RawRecord],
    partitions: np.ndarray,
    *,
    max_tick_bytes: int,
    max_symbol_length: int,
) -> tuple[DecodedTicks, list[BadTick]]:
    """:func:`decode_ticks` one record at a time, with a reason for each bad tick."""
    symbols: list[str] = []
    prices: list[float] = []
    times: list[int] = []
    good_partitions: list[int] = []
    offsets: list[int] = []
    bad: list[BadTick] = []
    for record, partition in zip(records, np.asarray(partitions).tolist(), strict=True):
        value = record.value
        if not value:
            bad.append(BadTick(record, partition, "empty", "record has no value"))
            continue
        if len(value) > max_tick_bytes:
            detail = f"value is {len(value)} bytes, limit {max_tick_bytes}"
            bad.append(BadTick(record, partition, "oversized", detail))
            continue
        try:
            symbol, price, ts = decode_tick_value(value, max_symbol_length)
        except InvalidTickError as invalid:
            bad.append(BadTick(record, partition, invalid.reason, invalid.detail))
            continue
        symbols.append(symbol)
        prices.append(price)
        times.append(ts)
        good_partitions.append(partition)
        offsets.append(record.offset)
    decoded = DecodedTicks(
        symbols=symbols,
        prices=np.asarray(prices, dtype=np.float64),
        ts=np.asarray(times, dtype=np.int64),
        partitions=np.asarray(good_partitions, dtype=np.int32),
        offsets=np.asarray(offsets, dtype=np.int64),
    )
    return decoded, bad


def encode_tick(symbol: str, price: float, ts: int) -> bytes:
    """The canonical tick value (used by the tests; :func:`encode_ticks` for many)."""
    return orjson.dumps({"symbol": symbol, "price": price, "ts": ts})


def tick_prefix(symbol: str) -> bytes:
    """A tick value up to its price, ``b'{"symbol":"QQQ","price":'``, for :func:`encode_ticks`
    (a producer of many ticks per symbol encodes it once per symbol)."""
    return b'{"symbol":%b,"price":' % orjson.dumps(symbol)


def encode_ticks(prefixes: Sequence[bytes], prices: np.ndarray, ts: Sequence[int]) -> list[bytes]:
    """:func:`encode_tick` for many ticks, byte for byte, at about a third of the cost:
    ``prefixes[i]`` is :func:`tick_prefix` of tick i's symbol; prices are formatted per
    batch (:func:`json_numbers`)."""
    return [
        b'%b%b,"ts":%d}' % (prefix, price, t)
        for prefix, price, t in zip(prefixes, json_numbers(prices), ts, strict=True)
    ]


def json_numbers(values: np.ndarray) -> list[bytes]:
    """Each float of a 1-D array as JSON text (``null`` for NaN and infinities), formatted
    by orjson in one call: byte for byte what ``orjson.dumps`` gives for each on its own."""
    if not len(values):
        return []
    contiguous = np.ascontiguousarray(values, dtype=np.float64)  # orjson requires both
    return orjson.dumps(contiguous, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")
