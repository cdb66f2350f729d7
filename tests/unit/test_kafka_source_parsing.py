"""Training from Kafka without a broker: --since parsing, tick decoding, per-symbol series.

Covers ``parse_duration``, ``parse_since``, ``decode_tick`` and ``build_series`` of
:mod:`model.kafka_source` on real price series turned into tick records.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.data import PriceSeries, load_series
from model.kafka_source import (
    TickColumns,
    build_series,
    decode_tick,
    newest_start,
    newest_starts,
    parse_duration,
    parse_since,
)
from model.tick_rules import MAX_SYMBOL_LENGTH, MAX_TICK_BYTES, MAX_TS_MS

NOW = datetime(2024, 5, 8, 12, 0, tzinfo=UTC)
NOW_MS = 1_715_169_600_000


def tick(symbol: str, price: float, ts: int) -> bytes:
    return orjson.dumps({"symbol": symbol, "price": price, "ts": ts})


def ticks_of(series: PriceSeries, rows: slice = slice(None)) -> list[bytes]:
    return [
        tick(series.symbol, p, t)
        for p, t in zip(series.prices[rows].tolist(), series.ts[rows].tolist(), strict=True)
    ]


# --------------------------------------------------------------------------- parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", timedelta(days=7)),
        ("7D", timedelta(days=7)),
        ("1h", timedelta(hours=1)),
        ("30m", timedelta(minutes=30)),
        ("90s", timedelta(seconds=90)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("P7D", timedelta(days=7)),
        ("PT1H30M", timedelta(hours=1, minutes=30)),
        ("  12h ", timedelta(hours=12)),
        ("250ms", timedelta(milliseconds=250)),
    ],
)
def test_parse_duration_accepts_short_and_iso_forms(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


def test_parse_duration_lower_case_day_needs_no_deprecated_pandas_unit() -> None:
    # pandas 3 deprecates "d" (Pandas4Warning; the suite makes warnings errors): "7d" and
    # "2d12h" are the documented forms, so they are read as "D".
    assert parse_duration("2d12h") == timedelta(days=2, hours=12)
    assert parse_duration("7 days") == timedelta(days=7)


@pytest.mark.parametrize("text", ["90", "1714521600000", "1.5", "-3"])
def test_parse_duration_wants_a_unit(text: str) -> None:
    # pandas would read a bare number as nanoseconds: epoch ms meant for --since would
    # silently become minutes back.
    with pytest.raises(ValueError, match="needs a unit"):
        parse_duration(text)


def test_parse_since_is_exact_to_the_millisecond() -> None:
    # int(float seconds * 1000) landed 1 ms early on these (and ~0.6 % of random times).
    assert parse_since("2004-09-18T12:03:00.840Z") == 1_095_508_980_840
    now = datetime(2004, 3, 9, 2, 8, 51, 860000, tzinfo=UTC)
    assert parse_since("1d", now=now) == 1_078_711_731_860
    with pytest.raises(ValueError, match="--since wants"):
        parse_since("1714521600000")  # epoch ms: neither a duration nor an ISO time


@pytest.mark.parametrize("text", ["abc", "7 fortnights", "h7", "1h30"])
def test_parse_duration_rejects_what_is_no_duration(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    "text",
    [
        "-1d",
        "-1D",
        "-P1D",
        "-2h",
        "0s",
        "0d",
        "",
        "NaT",
    ],
)
def test_parse_duration_rejects_zero_negative_and_empty(text: str) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        parse_duration(text)


# --------------------------------------------------------------------------- parse_since


@pytest.mark.parametrize(
    ("text", "back"),
    [
        ("7d", timedelta(days=7)),
        ("12h", timedelta(hours=12)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("P1D", timedelta(days=1)),
    ],
)
def test_parse_since_duration_counts_back_from_now(text: str, back: timedelta) -> None:
    assert parse_since(text, now=NOW) == NOW_MS - back // timedelta(milliseconds=1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T00:00Z", 1_714_521_600_000),
        ("2024-05-01T00:00:00+00:00", 1_714_521_600_000),
        ("2024-05-01T02:00+02:00", 1_714_521_600_000),
        ("2024-04-30T19:00-05:00", 1_714_521_600_000),
        ("2024-05-01T00:00:00.250Z", 1_714_521_600_250),
    ],
)
def test_parse_since_iso_time_with_zone(text: str, expected: int) -> None:
    assert parse_since(text, now=NOW) == expected


@pytest.mark.parametrize(
    ("naive", "utc"),
    [
        ("2024-05-01", "2024-05-01T00:00Z"),
        ("2024-05-01T09:30", "2024-05-01T09:30Z"),
        ("2024-05-01 09:30:00.125", "2024-05-01T09:30:00.125Z"),
    ],
)
def test_parse_since_iso_time_without_zone_is_utc(naive: str, utc: str) -> None:
    assert parse_since(naive, now=NOW) == parse_since(utc, now=NOW)


def test_parse_since_iso_time_ignores_now() -> None:
    later = NOW + timedelta(days=30)
    assert parse_since("2024-05-01T00:00Z", now=NOW) == parse_since("2024-05-01T00:00Z", now=later)


def test_parse_since_with_a_zoned_now_is_the_same_instant() -> None:
    tokyo = NOW.astimezone(timezone(timedelta(hours=9)))
    assert parse_since("12h", now=tokyo) == parse_since("12h", now=NOW) == NOW_MS - 43_200_000


@pytest.mark.parametrize("text", ["garbage", "-12h", "yesterday-ish", "2024-13-45"])
def test_parse_since_rejects_what_is_neither(text: str) -> None:
    with pytest.raises(ValueError, match="--since wants a duration"):
        parse_since(text, now=NOW)


@pytest.mark.parametrize("text", ["", "NaT"])
def test_parse_since_rejects_empty_and_not_a_time(text: str) -> None:
    with pytest.raises(ValueError, match="not a time"):
        parse_since(text, now=NOW)


# --------------------------------------------------------------------------- decode_tick


def test_decode_tick_real_ticks_round_trip(goog: PriceSeries) -> None:
    for value, price, ts in zip(ticks_of(goog), goog.prices, goog.ts, strict=True):
        assert decode_tick(value) == ("GOOG", float(price), int(ts))


def test_decode_tick_extra_fields_are_ignored() -> None:
    value = orjson.dumps({"symbol": "QQQ", "price": 312.45, "ts": 1_704_205_800_000, "x": [1]})
    assert decode_tick(value) == ("QQQ", 312.45, 1_704_205_800_000)


def test_decode_tick_integer_price_and_integral_float_ts() -> None:
    decoded = decode_tick(b'{"symbol": "A", "price": 100, "ts": 1.7e12}')
    assert decoded == ("A", 100.0, 1_700_000_000_000)
    assert isinstance(decoded, tuple)
    assert type(decoded[1]) is float
    assert type(decoded[2]) is int


def test_decode_tick_size_limit_is_inclusive() -> None:
    head = b'{"symbol": "A", "price": 1.5, "ts": 5, "pad": "'
    pad = MAX_TICK_BYTES - len(head) - 2
    at_limit = head + b"x" * pad + b'"}'
    assert len(at_limit) == MAX_TICK_BYTES
    assert decode_tick(at_limit) == ("A", 1.5, 5)
    assert decode_tick(head + b"x" * (pad + 1) + b'"}') == "oversized"


def test_decode_tick_symbol_length_limit_is_inclusive() -> None:
    longest = "S" * MAX_SYMBOL_LENGTH
    assert decode_tick(tick(longest, 1.0, 5)) == (longest, 1.0, 5)
    assert decode_tick(tick(longest + "S", 1.0, 5)) == "bad_symbol"


def test_decode_tick_ts_bounds_are_exclusive() -> None:
    assert decode_tick(tick("A", 1.0, 1)) == ("A", 1.0, 1)
    assert decode_tick(tick("A", 1.0, MAX_TS_MS - 1)) == ("A", 1.0, MAX_TS_MS - 1)
    assert decode_tick(tick("A", 1.0, 0)) == "bad_ts"
    assert decode_tick(tick("A", 1.0, MAX_TS_MS)) == "bad_ts"


# Values that are no usable tick, each with the reason decode_tick gives.
INVALID = [
    (None, "empty"),
    (b"", "empty"),
    (b"x" * (MAX_TICK_BYTES + 1), "oversized"),
    (b"{not json", "not_json"),
    (b"\xff\xfe", "not_utf8"),
    # JSON has no NaN or infinity: orjson refuses them, so no non-finite price gets through.
    (b'{"symbol": "A", "price": NaN, "ts": 5}', "not_json"),
    (b'{"symbol": "A", "price": Infinity, "ts": 5}', "not_json"),
    (b'{"symbol": "A", "price": 1e400, "ts": 5}', "not_json"),
    (b"[1, 2]", "not_object"),
    (b'"QQQ"', "not_object"),
    (b"42", "not_object"),
    (b'{"symbol": "A", "price": 1.0}', "missing_field"),
    (b'{"symbol": "A", "ts": 5}', "missing_field"),
    (b'{"price": 1.0, "ts": 5}', "missing_field"),
    # The daemon's rules (model.tick_rules): a field that is there but null has a bad value.
    (b'{"symbol": null, "price": 1.0, "ts": 5}', "bad_symbol"),
    (b'{"symbol": "A", "price": null, "ts": 5}', "bad_price"),
    (b'{"symbol": "A", "price": 1.0, "ts": null}', "bad_ts"),
    # Beyond float32, which windows and model inputs hold: the daemon dead-letters it.
    (b'{"symbol": "A", "price": 1e39, "ts": 5}', "bad_price"),
    (b'{"symbol": "A", "price": 1e-39, "ts": 5}', "bad_price"),
    (b'{"symbol": "", "price": 1.0, "ts": 5}', "bad_symbol"),
    (b'{"symbol": 7, "price": 1.0, "ts": 5}', "bad_symbol"),
    (b'{"symbol": ["A"], "price": 1.0, "ts": 5}', "bad_symbol"),
    (b'{"symbol": "A\\u0007", "price": 1.0, "ts": 5}', "bad_symbol"),
    (b'{"symbol": "A\\nB", "price": 1.0, "ts": 5}', "bad_symbol"),
    (b'{"symbol": "A", "price": true, "ts": 5}', "bad_price"),
    (b'{"symbol": "A", "price": "1.0", "ts": 5}', "bad_price"),
    (b'{"symbol": "A", "price": [1.0], "ts": 5}', "bad_price"),
    (b'{"symbol": "A", "price": -1.0, "ts": 5}', "bad_price"),
    (b'{"symbol": "A", "price": 0, "ts": 5}', "bad_price"),
    (b'{"symbol": "A", "price": -0.0, "ts": 5}', "bad_price"),
    (b'{"symbol": "A", "price": 1.0, "ts": 1.5}', "bad_ts"),
    (b'{"symbol": "A", "price": 1.0, "ts": "1700000000000"}', "bad_ts"),
    (b'{"symbol": "A", "price": 1.0, "ts": false}', "bad_ts"),
    (b'{"symbol": "A", "price": 1.0, "ts": -5}', "bad_ts"),
    (b'{"symbol": "A", "price": 1.0, "ts": 1700000000000000}', "bad_ts"),  # microseconds
    (b'{"symbol": "A", "price": 1.0, "ts": 18446744073709551615}', "bad_ts"),
]


@pytest.mark.parametrize(("value", "reason"), INVALID)
def test_decode_tick_names_the_reason(value: bytes | None, reason: str) -> None:
    assert decode_tick(value) == reason


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_decode_tick_never_raises(value: bytes) -> None:
    decoded = decode_tick(value)
    if isinstance(decoded, tuple):
        symbol, price, ts = decoded
        assert symbol and price > 0 and 0 < ts < MAX_TS_MS


# --------------------------------------------------------------------------- build_series


def test_build_series_one_sorted_series_per_symbol(goog: PriceSeries, nasdaq: PriceSeries) -> None:
    values = ticks_of(goog) + ticks_of(nasdaq, slice(0, 1000))
    random.Random(7).shuffle(values)
    result = build_series(values, topic="ticks", min_ticks=10)
    assert [s.symbol for s in result.series] == ["GOOG", "NASDAQ"]  # sorted by symbol
    built = {s.symbol: s for s in result.series}
    np.testing.assert_array_equal(built["GOOG"].ts, goog.ts)
    np.testing.assert_array_equal(built["GOOG"].prices, goog.prices)
    np.testing.assert_array_equal(built["NASDAQ"].ts, nasdaq.ts[:1000])
    np.testing.assert_array_equal(built["NASDAQ"].prices, nasdaq.prices[:1000])
    assert all(s.source == "kafka:ticks" for s in result.series)
    assert result.records == len(goog) + 1000
    assert result.duplicates == 0 and not result.invalid and not result.too_short


def test_build_series_keeps_the_first_of_a_repeated_tick(goog: PriceSeries) -> None:
    values = ticks_of(goog, slice(0, 50))
    ts = int(goog.ts[10])
    # A redelivered tick, then one with the same ts but another price (and ts as a float).
    values += [values[10], tick("GOOG", 999.0, ts), b'{"symbol":"GOOG","price":1.0,"ts":%d.0}' % ts]
    result = build_series(values, topic="ticks", min_ticks=2)
    assert result.duplicates == 3
    assert result.records == 53
    (series,) = result.series
    assert len(series) == 50
    np.testing.assert_array_equal(series.prices, goog.prices[:50])


def test_build_series_first_kept_even_when_the_later_one_comes_first_in_time(
    goog: PriceSeries,
) -> None:
    values = ticks_of(goog, slice(0, 20))[::-1]  # newest first: consumption order is not time
    values.append(tick("GOOG", 1.0, int(goog.ts[0])))
    (series,) = build_series(values, topic="t", min_ticks=2).series
    np.testing.assert_array_equal(series.ts, goog.ts[:20])
    assert series.prices[0] == goog.prices[0]


def test_build_series_reports_too_short_symbols(goog: PriceSeries, nasdaq: PriceSeries) -> None:
    values = ticks_of(goog, slice(0, 30)) + ticks_of(nasdaq, slice(0, 29))
    result = build_series(values, topic="ticks", min_ticks=30)
    assert [s.symbol for s in result.series] == ["GOOG"]  # exactly min_ticks is enough
    assert result.too_short == {"NASDAQ": 29}
    assert result.summary()["too_short"] == {"NASDAQ": 29}
    assert result.summary()["symbols"] == {"GOOG": 30}


def test_build_series_duplicates_do_not_count_towards_min_ticks(goog: PriceSeries) -> None:
    values = ticks_of(goog, slice(0, 5)) * 4
    result = build_series(values, topic="ticks", min_ticks=6)
    assert result.series == []
    assert result.too_short == {"GOOG": 5}
    assert result.duplicates == 15


def test_build_series_counts_invalid_ticks_by_reason(goog: PriceSeries) -> None:
    good = ticks_of(goog, slice(0, 40))
    bad = [None, b"", b"{", b"[]", b'{"symbol": "X", "price": -2, "ts": 5}', b"{"]
    values = good[:20] + bad + good[20:]
    result = build_series(values, topic="ticks", min_ticks=10)
    assert dict(result.invalid) == {"empty": 2, "not_json": 2, "not_object": 1, "bad_price": 1}
    assert result.records == 46
    assert len(result.series[0]) == 40
    assert result.summary()["invalid"] == dict(result.invalid)


def test_build_series_only_records_since(goog: PriceSeries) -> None:
    # since_ms picks the records the consumer reads; build_series keeps every tick it gets.
    since = int(goog.ts[100])
    result = build_series(ticks_of(goog, slice(0, 200)), topic="t", min_ticks=2, since_ms=since)
    assert len(result.series[0]) == 200
    assert result.since_ms == since
    assert result.summary()["since"] == datetime.fromtimestamp(since / 1000, UTC).isoformat()
    assert build_series([], topic="t", min_ticks=2).summary()["since"] is None


def test_build_series_of_nothing() -> None:
    result = build_series([], topic="empty", min_ticks=1)
    assert result.series == [] and result.records == 0
    assert result.summary() == {
        "topic": "empty",
        "records": 0,
        "in_range": None,
        "cut_to_newest": False,
        "cut_to_newest_since": None,
        "invalid": {},
        "duplicates": 0,
        "symbols": {},
        "too_short": {},
        "since": None,
    }


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_build_series_any_order_with_redeliveries(data: st.DataObject) -> None:
    series = load_series("dataset:btcusd")[0]
    order = data.draw(st.permutations(range(len(series))))
    repeats = data.draw(st.lists(st.integers(0, len(series) - 1), max_size=30))
    values = [ticks_of(series)[i] for i in [*order, *repeats]]
    result = build_series(values, topic="t", min_ticks=1)
    (built,) = result.series
    np.testing.assert_array_equal(built.ts, series.ts)
    np.testing.assert_array_equal(built.prices, series.prices)
    assert result.duplicates == len(repeats)


def test_tick_columns_across_fetches_keep_the_first_of_a_repeat(goog: PriceSeries) -> None:
    """A repeat in a later fetch than its first copy is still the one dropped."""
    values = ticks_of(goog, slice(0, 100))
    repeat = tick(goog.symbol, 1.0, int(goog.ts[10]))  # same ts, another price
    columns = TickColumns()
    for fetch in (values[:40], [repeat, b"garbage"], values[40:], []):
        columns.add(fetch)
    result = columns.to_ticks(topic="t", min_ticks=2)
    (series,) = result.series
    np.testing.assert_array_equal(series.prices, goog.prices[:100])
    assert (result.records, result.duplicates, dict(result.invalid)) == (
        102,
        1,
        {"not_json": 1},
    )


def test_training_refuses_the_ticks_the_daemon_is_configured_to_refuse(
    goog: PriceSeries, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TICKCAST_MAX_SYMBOL_LENGTH / TICKCAST_MAX_TICK_BYTES reach load_kafka_series as they
    reach the daemon: no tick trains a model that serving would refuse."""
    import model.kafka_source as kafka_source
    from model.kafka_access import KafkaAccess

    monkeypatch.setenv("TICKCAST_MAX_SYMBOL_LENGTH", "4")
    monkeypatch.setenv("TICKCAST_MAX_TICK_BYTES", "100")
    access = KafkaAccess()
    assert (access.max_symbol_length, access.max_tick_bytes) == (4, 100)
    long_symbol = [
        tick("GOOGL", float(p), int(t)) for p, t in zip(goog.prices, goog.ts, strict=True)
    ]
    padded = orjson.dumps({"symbol": "PAD", "price": 1.0, "ts": 1, "pad": "x" * 80})
    assert len(padded) > 100

    async def read_topic(bootstrap, topic, into, **kwargs):
        into.add([*ticks_of(goog, slice(0, 100)), *long_symbol[:50], padded])
        return kafka_source.TopicRead(in_range=151)

    monkeypatch.setattr(kafka_source, "read_topic", read_topic)
    result = kafka_source.load_kafka_series(access, min_ticks=2)
    assert [s.symbol for s in result.series] == ["GOOG"]
    assert dict(result.invalid) == {"bad_symbol": 50, "oversized": 1}


# --------------------------------------------------------------------------- newest_start


@pytest.mark.parametrize("limit", [0, 1, 4, 5, 6, 9, 10, 100])
def test_newest_start_is_the_earliest_time_within_the_limit(limit: int) -> None:
    """Records at times 10, 20, 20, 30, ... (several at one time): the start found keeps
    at most ``limit`` records, and one millisecond earlier would keep more."""
    stamps = np.array([10, 20, 20, 30, 40, 40, 40, 50, 60, 70])
    calls: list[int] = []

    async def count_since(moment: int) -> int:
        calls.append(moment)
        return int((stamps >= moment).sum())

    start = asyncio.run(newest_start(count_since, 0, MAX_TS_MS, limit))
    assert (stamps >= start).sum() <= limit
    if start > 0:
        assert (stamps >= start - 1).sum() > limit
    assert len(calls) <= 45  # bisection over the whole ts range, not a scan


def test_newest_start_from_since_when_all_fit() -> None:
    async def count_since(moment: int) -> int:
        return 3

    assert asyncio.run(newest_start(count_since, 1_000, MAX_TS_MS, 3)) == 1_000


def offsets_by_time(times: dict[str, list[int]]) -> Callable[[int], Awaitable[dict[str, int]]]:
    """The broker's offsets by time over partitions of record times: the first offset
    whose record time is at or after the moment, else the end."""

    async def offsets_at(moment: int) -> dict[str, int]:
        return {
            p: next((i for i, t in enumerate(ts) if t >= moment), len(ts))
            for p, ts in times.items()
        }

    return offsets_at


def test_newest_starts_cut_every_partition_at_one_time() -> None:
    times = {"a": list(range(0, 1000, 2)), "b": list(range(1, 1000, 2))}  # interleaved
    starts, ends = {"a": 10, "b": 0}, {"a": 500, "b": 500}
    cut, cut_ms = asyncio.run(
        newest_starts(starts, ends, offsets_by_time(times), low_ms=0, limit=300)
    )
    assert cut_ms is not None
    kept = [t for p in times for t in times[p][cut[p] : ends[p]]]
    dropped = [t for p in times for t in times[p][starts[p] : cut[p]]]
    assert 150 <= len(kept) <= 300
    assert min(kept) >= cut_ms > max(dropped)  # the newest records, whatever the partition


def test_newest_starts_fall_back_to_offsets_when_a_record_is_stamped_ahead() -> None:
    """One record whose producer's clock ran a minute ahead, early in partition a: every
    time cut before its stamp keeps too many records, the one after it almost none. Each
    partition keeps its share of the limit by offset instead."""
    times = {"a": list(range(0, 2000, 2)), "b": list(range(1, 2000, 2))}
    times["a"][5] = 60_000
    starts, ends = {"a": 0, "b": 0}, {"a": 1000, "b": 600}
    cut, cut_ms = asyncio.run(
        newest_starts(starts, ends, offsets_by_time(times), low_ms=0, limit=400)
    )
    assert cut_ms is None
    assert cut == {"a": 1000 - 250, "b": 600 - 150}  # 400 in proportion to 1000 : 600


def test_newest_starts_never_before_the_given_starts() -> None:
    times = {"a": list(range(100))}
    cut, _ = asyncio.run(
        newest_starts({"a": 90}, {"a": 100}, offsets_by_time(times), low_ms=0, limit=5)
    )
    assert 90 <= cut["a"] <= 100 and 100 - cut["a"] <= 5
