"""Tick decoding: the column-wise fast path and the record-by-record path agree."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.ticks import (
    BAD_TICK_REASONS,
    MAX_TS_MS,
    DecodedTicks,
    _decode_clean,
    decode_one_by_one,
    decode_ticks,
    encode_tick,
    encode_ticks,
    tick_prefix,
)

LIMITS = {"max_tick_bytes": 256, "max_symbol_length": 8}


def record(offset: int, value: bytes | None, partition: int = 0) -> ConsumerRecord[bytes, bytes]:
    size = len(value) if value is not None else -1
    return ConsumerRecord("ticks", partition, offset, 0, 0, None, value, None, 0, size, ())


def partitions_of(records: list[ConsumerRecord[bytes, bytes]]) -> np.ndarray:
    return np.array([r.partition for r in records], dtype=np.int32)


def good(symbol: str, price: float, ts: int) -> bytes:
    return orjson.dumps({"symbol": symbol, "price": price, "ts": ts})


# Values that are not usable ticks, each with the reason the one-by-one path gives.
BAD_VALUES = [
    (None, "empty"),
    (b"", "empty"),
    (b"x" * 300, "oversized"),
    (b"\xff\xfe", "not_utf8"),
    (b"{not json", "not_json"),
    (b"[1, 2]", "not_object"),
    (b'{"symbol": "A", "price": 1.0}', "missing_field"),
    (b'{"symbol": "", "price": 1.0, "ts": 5}', "bad_symbol"),
    (b'{"symbol": "TOOLONGSYM", "price": 1.0, "ts": 5}', "bad_symbol"),
    (b'{"symbol": "A\\u0007", "price": 1.0, "ts": 5}', "bad_symbol"),
    (b'{"symbol": 7, "price": 1.0, "ts": 5}', "bad_symbol"),
    (b'{"symbol": "A", "price": true, "ts": 5}', "bad_price"),
    (b'{"symbol": "A", "price": "1.0", "ts": 5}', "bad_price"),
    (b'{"symbol": "A", "price": -1.0, "ts": 5}', "bad_price"),
    (b'{"symbol": "A", "price": 0, "ts": 5}', "bad_price"),
    # Finite doubles the float32 windows cannot hold (stored as inf, or as 0).
    (b'{"symbol": "A", "price": 3.5e38, "ts": 5}', "bad_price"),
    (b'{"symbol": "A", "price": 1e308, "ts": 5}', "bad_price"),
    (b'{"symbol": "A", "price": 1e-50, "ts": 5}', "bad_price"),
    (b'{"symbol": "A", "price": 1.0, "ts": 1.5}', "bad_ts"),
    (b'{"symbol": "A", "price": 1.0, "ts": false}', "bad_ts"),
    (b'{"symbol": "A", "price": 1.0, "ts": 0}', "bad_ts"),
    (b'{"symbol": "A", "price": 1.0, "ts": 18446744073709551615}', "bad_ts"),
    (orjson.dumps({"symbol": "A", "price": 1.0, "ts": MAX_TS_MS}), "bad_ts"),
]
# Usable, but not on the fast path's exact types: the slow path must accept them.
ODD_BUT_GOOD = [
    b'{"symbol": "A", "price": 3, "ts": 1700000000000.0, "extra": [1]}',
    b'{"ts": 2.0, "price": 7, "symbol": "Z"}',
]


def same(a: DecodedTicks, b: DecodedTicks) -> bool:
    return (
        a.symbols == b.symbols
        and np.array_equal(a.prices, b.prices)
        and np.array_equal(a.ts, b.ts)
        and np.array_equal(a.partitions, b.partitions)
        and np.array_equal(a.offsets, b.offsets)
    )


@pytest.mark.parametrize(("value", "reason"), BAD_VALUES)
def test_each_bad_value_has_its_reason(value: bytes | None, reason: str) -> None:
    records = [record(0, good("A", 1.0, 1)), record(1, value, 4), record(2, good("B", 2.0, 2))]
    decoded, bad = decode_ticks(records, partitions_of(records), **LIMITS)
    assert decoded.symbols == ["A", "B"]
    assert decoded.offsets.tolist() == [0, 2]
    assert [(b.record.offset, b.partition, b.reason) for b in bad] == [(1, 4, reason)]
    assert reason in BAD_TICK_REASONS  # so its metric series exists from the start


def test_a_clean_fetch_takes_the_fast_path() -> None:
    records = [
        record(i, good(f"S{i % 7}", 100.0 + i, 1_700_000_000_000 + i), i % 3) for i in range(50)
    ]
    fast = _decode_clean(records, partitions_of(records), **LIMITS)
    assert fast is not None
    slow, bad = decode_one_by_one(records, partitions_of(records), **LIMITS)
    assert bad == [] and same(fast, slow)
    assert fast.prices.dtype == np.float64 and fast.ts.dtype == np.int64


def test_a_repeated_field_counts_once_the_same_way_on_both_paths() -> None:
    # JSON leaves duplicate keys open; both parsers keep the last, so both paths agree.
    records = [record(0, b'{"symbol": "A", "symbol": "B", "price": 2.0, "price": 3, "ts": 5}')]
    fast = _decode_clean(records, partitions_of(records), **LIMITS)
    slow, bad = decode_one_by_one(records, partitions_of(records), **LIMITS)
    assert fast is not None and bad == [] and same(fast, slow)
    assert fast.symbols == ["B"] and fast.prices.tolist() == [3.0]


@pytest.mark.parametrize("value", ODD_BUT_GOOD)
def test_odd_but_valid_ticks_fall_back_and_are_kept(value: bytes) -> None:
    records = [record(0, good("A", 1.0, 1)), record(1, value)]
    assert _decode_clean(records, partitions_of(records), **LIMITS) is None
    decoded, bad = decode_ticks(records, partitions_of(records), **LIMITS)
    assert bad == [] and decoded.offsets.tolist() == [0, 1]


def nested(depth: int) -> bytes:
    return b'{"symbol": "N", "price": 2.0, "ts": 7, "extra": %b}' % (b"[" * depth + b"]" * depth)


def test_deeply_nested_extra_fields_never_raise() -> None:
    """msgspec raises RecursionError (not a DecodeError) on ~1,000 nested lists, a 2 KB
    value; orjson parses up to 1,024 levels and refuses deeper ones. Neither may escape:
    the tick is kept (an unknown field is ignored) or dead-lettered as not JSON."""
    limits = {"max_tick_bytes": 8192, "max_symbol_length": 8}
    records = [record(0, good("A", 1.0, 1)), record(1, nested(1000)), record(2, nested(2000))]
    decoded, bad = decode_ticks(records, partitions_of(records), **limits)
    assert decoded.offsets.tolist() == [0, 1]
    assert [(b.record.offset, b.reason) for b in bad] == [(2, "not_json")]


values = st.one_of(
    st.builds(
        good,
        st.text(st.characters(codec="ascii", categories=["Lu", "Nd"]), min_size=1, max_size=8),
        st.floats(min_value=1e-6, max_value=1e9),
        st.integers(1, MAX_TS_MS - 1),
    ),
    st.sampled_from([v for v, _ in BAD_VALUES] + ODD_BUT_GOOD),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(values, max_size=40))
def test_both_paths_agree(batch: list[bytes | None]) -> None:
    records = [record(i, v, i % 2) for i, v in enumerate(batch)]
    decoded, bad = decode_ticks(records, partitions_of(records), **LIMITS)
    reference, reference_bad = decode_one_by_one(records, partitions_of(records), **LIMITS)
    assert same(decoded, reference)
    assert [(b.record.offset, b.partition, b.reason) for b in bad] == [
        (b.record.offset, b.partition, b.reason) for b in reference_bad
    ]
    assert len(decoded) + len(bad) == len(records)  # nothing lost


@given(
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=20),
            st.floats(min_value=1e-300, max_value=1e300),
            st.integers(1, MAX_TS_MS - 1),
        ),
        max_size=30,
    )
)
def test_encode_ticks_writes_encode_tick_bytes(ticks: list[tuple[str, float, int]]) -> None:
    symbols = [t[0] for t in ticks]
    prices = np.array([t[1] for t in ticks], dtype=np.float64)
    values = encode_ticks([tick_prefix(s) for s in symbols], prices, [t[2] for t in ticks])
    assert values == [encode_tick(*t) for t in ticks]


# Unknown fields whose content one parser checks and the other skips: invalid UTF-8
# (msgspec does not decode skipped strings) and numbers beyond a double (orjson refuses).
odd_extras = st.one_of(
    st.binary(min_size=1, max_size=6).map(
        lambda b: b'"' + b.replace(b'"', b"").replace(b"\\", b"") + b'"'
    ),
    st.integers(300, 400).map(lambda e: b"1e%d" % e),
    st.integers(300, 400).map(lambda e: b"-9e%d" % e),
    st.just(b"9" * 400),
    st.just(b'"ok"'),
)


@settings(max_examples=300, deadline=None)
@given(odd_extras)
def test_a_ticks_verdict_does_not_depend_on_the_rest_of_its_fetch(extra: bytes) -> None:
    """Alone with good ticks (the fast path) or beside a bad one (the record-by-record
    path), the same record is kept or dead-lettered alike: otherwise a restore, which
    fetches ten times more records at once, could rebuild another window than the live
    path built."""
    tick = b'{"symbol":"B","price":2.0,"ts":2000,"x":%b}' % extra
    beside_good = [record(0, good("A", 1.0, 1)), record(1, tick)]
    beside_bad = [record(0, b"not json"), record(1, tick)]
    kept_fast, bad_fast = decode_ticks(beside_good, partitions_of(beside_good), **LIMITS)
    kept_slow, bad_slow = decode_ticks(beside_bad, partitions_of(beside_bad), **LIMITS)
    assert (1 in kept_fast.offsets.tolist()) == (1 in kept_slow.offsets.tolist())
    assert [b.reason for b in bad_fast] == [b.reason for b in bad_slow if b.record.offset == 1]
