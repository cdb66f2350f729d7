"""Loading price series, windows in true time order, and a split without look-ahead."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.data import (
    DATASETS,
    DataError,
    PriceSeries,
    chronological_split,
    load_many,
    load_series,
    make_windows,
)
from tests.support.series import SPANS, row_numbered_series


def seed_layout_csv(path: Path, rows: int = 300) -> pd.DataFrame:
    """The seed's QQQ.csv layout (Date,Open,High,Low,Close,Adj Close,Volume), from real data."""
    import arch.data.nasdaq

    frame = arch.data.nasdaq.load().iloc[:rows].reset_index()
    frame["Date"] = frame["Date"].dt.strftime("%Y-%m-%d")
    frame.to_csv(path, index=False)
    return frame


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_bundled_dataset_loads(name: str) -> None:
    (series,) = load_series(f"dataset:{name}")
    assert series.symbol == DATASETS[name][0]
    assert series.source == f"dataset:{name}"
    assert len(series) > 100
    assert series.ts.dtype == np.int64
    assert series.prices.dtype == np.float64
    assert (np.diff(series.ts) > 0).all()
    assert (series.prices > 0).all()


def test_dataset_name_is_case_insensitive() -> None:
    assert load_series("dataset:GOOG")[0].symbol == "GOOG"


def test_seed_csv_layout(tmp_path: Path) -> None:
    frame = seed_layout_csv(tmp_path / "qqq.csv")
    (series,) = load_series(str(tmp_path / "qqq.csv"))
    assert series.symbol == "QQQ"
    np.testing.assert_array_equal(series.prices, frame["Close"].to_numpy())
    assert series.iso_range()[0] == "1999-01-04T00:00:00+00:00"


def test_numeric_yyyymmdd_dates_are_dates(tmp_path: Path) -> None:
    # Read as epoch ms, 19990104 would be 5 hours after 1970-01-01.
    frame = seed_layout_csv(tmp_path / "a.csv")
    frame["Date"] = frame["Date"].str.replace("-", "").astype(int)
    frame.to_csv(tmp_path / "qqq.csv", index=False)
    (series,) = load_series(str(tmp_path / "qqq.csv"))
    assert series.iso_range()[0] == "1999-01-04T00:00:00+00:00"
    np.testing.assert_array_equal(series.prices, frame["Close"].to_numpy())


def test_other_numeric_dates_are_a_clear_error(tmp_path: Path) -> None:
    frame = seed_layout_csv(tmp_path / "a.csv")
    epoch = pd.to_datetime(frame["Date"]) - pd.Timestamp("1970-01-01")
    frame["Date"] = epoch // pd.Timedelta("1ms")
    frame.to_csv(tmp_path / "qqq.csv", index=False)
    with pytest.raises(DataError, match="not YYYYMMDD dates, the first at row 0"):
        load_series(str(tmp_path / "qqq.csv"))


def test_csv_columns_case_insensitive_and_rows_sorted(tmp_path: Path) -> None:
    frame = seed_layout_csv(tmp_path / "a.csv")
    newest_first = frame.iloc[::-1].rename(columns=str.lower)
    newest_first.to_csv(tmp_path / "qqq.csv", index=False)
    (series,) = load_series(str(tmp_path / "qqq.csv"))
    np.testing.assert_array_equal(series.prices, frame["Close"].to_numpy())
    assert (np.diff(series.ts) > 0).all()


@pytest.mark.parametrize("ts_kind", ["epoch_ms", "datetime"])
def test_long_table_gives_one_series_per_symbol(tmp_path: Path, ts_kind: str) -> None:
    goog = load_series("dataset:goog")[0]
    eur = load_series("dataset:eurusd")[0]
    parts = []
    for series in (goog, eur):
        ts: object = series.ts[:200]
        if ts_kind == "datetime":
            ts = pd.to_datetime(series.ts[:200], unit="ms", utc=True)
        parts.append(
            pd.DataFrame({"symbol": series.symbol, "ts": ts, "price": series.prices[:200]})
        )
    # Interleave the symbols' rows, as a tick log would.
    table = pd.concat(parts).sample(frac=1.0, random_state=0).rename(columns={"price": "Price"})
    table.to_parquet(tmp_path / "ticks.parquet")
    loaded = {s.symbol: s for s in load_series(str(tmp_path / "ticks.parquet"))}
    assert set(loaded) == {"GOOG", "EURUSD"}
    for series in (goog, eur):
        np.testing.assert_array_equal(loaded[series.symbol].ts, series.ts[:200])
        np.testing.assert_array_equal(loaded[series.symbol].prices, series.prices[:200])


def test_load_many_concatenates_and_refuses_a_symbol_twice() -> None:
    assert [s.symbol for s in load_many(["dataset:goog", "dataset:btcusd"])] == ["GOOG", "BTCUSD"]
    with pytest.raises(DataError, match="GOOG"):
        load_many(["dataset:goog", "dataset:goog"])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_series(str(tmp_path / "nope.csv"))


def test_unknown_dataset_lists_the_known_ones() -> None:
    with pytest.raises(DataError, match="unknown dataset") as info:
        load_series("dataset:ftse")
    for name in DATASETS:
        assert f"dataset:{name}" in str(info.value)


def test_missing_close_column(tmp_path: Path) -> None:
    frame = seed_layout_csv(tmp_path / "a.csv")
    frame.drop(columns=["Close"]).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(DataError, match="no Close column"):
        load_series(str(tmp_path / "b.csv"))


def test_nan_prices_are_a_clear_error(tmp_path: Path) -> None:
    frame = seed_layout_csv(tmp_path / "a.csv")
    frame["Close"] = frame["Close"].astype(object)
    frame.loc[5, "Close"] = "null"  # what Yahoo writes for a missing price
    frame.to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(DataError, match=r"1 price\(s\) are NaN.*row 5 \(1999-01-11"):
        load_series(str(tmp_path / "b.csv"))


def test_one_row_is_too_few(tmp_path: Path) -> None:
    seed_layout_csv(tmp_path / "a.csv", rows=1)
    with pytest.raises(DataError, match="at least 2"):
        load_series(str(tmp_path / "a.csv"))


def test_price_series_validation(nasdaq: PriceSeries) -> None:
    ts, prices = nasdaq.ts[:10], nasdaq.prices[:10]
    with pytest.raises(DataError, match="timestamps but"):
        PriceSeries("X", "t", ts, prices[:9])
    with pytest.raises(DataError, match="strictly increasing"):
        PriceSeries("X", "t", ts[::-1], prices)
    with pytest.raises(DataError, match="not positive"):
        PriceSeries("X", "t", ts, -prices)
    series = PriceSeries("X", "t", ts, prices)
    assert not series.prices.flags.writeable


def test_make_windows_true_time_order(nasdaq: PriceSeries) -> None:
    prices = nasdaq.prices[:500]
    windows, targets = make_windows(prices, 60)
    assert windows.shape == (440, 60)
    for i in (0, 1, 100, 439):
        np.testing.assert_array_equal(windows[i], prices[i : i + 60])
        assert targets[i] == prices[i + 60]
    # Oldest first: the window's last price is the one just before its target.
    np.testing.assert_array_equal(windows[1:, -1], targets[:-1])
    assert np.shares_memory(windows, prices)  # a strided view, not 440 copies


def test_make_windows_too_short() -> None:
    windows, targets = make_windows(np.arange(1.0, 61.0), 60)
    assert windows.shape == (0, 60)
    assert targets.shape == (0,)


def test_split_of_real_series(nasdaq: PriceSeries) -> None:
    split = chronological_split(nasdaq, window_length=60)
    assert len(split.train) + len(split.val) + len(split.test) == len(nasdaq) - 60
    assert len(split.test) == round((len(nasdaq) - 60) * 0.15)
    assert split.train.target_ts.max() < split.val.target_ts.min()
    assert split.val.target_ts.max() < split.test.target_ts.min()
    assert split.test.target_ts[-1] == nasdaq.ts[-1]
    assert split.cuts[0].fit_rows == len(nasdaq) - len(split.test)


def test_split_needs_one_window_and_target_per_split(nasdaq: PriceSeries) -> None:
    short = PriceSeries("X", "t", nasdaq.ts[:62], nasdaq.prices[:62])
    with pytest.raises(DataError, match="at least 63"):
        chronological_split(short, window_length=60)
    with pytest.raises(DataError, match="at least 63"):
        chronological_split([nasdaq, short], window_length=60, split_by="time")
    enough = PriceSeries("X", "t", nasdaq.ts[:63], nasdaq.prices[:63])
    split = chronological_split(enough, window_length=60)
    assert (len(split.train), len(split.val), len(split.test)) == (1, 1, 1)


# Synthetic prices here on purpose: each price equals 1 + its row number (plus an offset per
# series), so a window's contents reveal exactly which rows it was built from.
@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=120), min_size=1, max_size=3),
    window=st.integers(min_value=1, max_value=30),
    val_fraction=st.floats(min_value=0.01, max_value=0.4),
    test_fraction=st.floats(min_value=0.01, max_value=0.4),
)
def test_split_has_no_look_ahead(
    lengths: list[int], window: int, val_fraction: float, test_fraction: float
) -> None:
    series = [
        PriceSeries(
            f"S{k}",
            "synthetic",
            np.arange(window + 3 + extra, dtype=np.int64) * 1000,
            1.0 + k * 1e6 + np.arange(window + 3 + extra),
        )
        for k, extra in enumerate(lengths)
    ]
    split = chronological_split(series, val_fraction, test_fraction, window)
    parts = (split.train, split.val, split.test)
    for part in parts:
        rows = part.windows - 1.0 - part.series_index[:, None] * 1e6
        target_rows = part.targets - 1.0 - part.series_index * 1e6
        # Each window is the `window` consecutive rows just before its target, in order,
        # and all from the target's own series.
        np.testing.assert_array_equal(rows, target_rows[:, None] - np.arange(window, 0, -1))
        np.testing.assert_array_equal(part.target_ts, target_rows.astype(np.int64) * 1000)
    for k, cut in enumerate(split.cuts):
        train, val, test = (p.targets[p.series_index == k] for p in parts)
        assert min(len(train), len(val), len(test)) >= 1
        assert train.max() < val.min() and val.max() < test.min()
        # Every target of the series is used exactly once.
        all_targets = np.concatenate([train, val, test])
        np.testing.assert_array_equal(all_targets, series[k].prices[window:])
        assert cut.fit_rows == len(series[k]) - len(test)


@settings(max_examples=80, deadline=None)
@given(
    spans=SPANS,
    window=st.integers(min_value=1, max_value=30),
    val_fraction=st.floats(min_value=0.01, max_value=0.4),
    test_fraction=st.floats(min_value=0.01, max_value=0.4),
)
def test_a_common_time_split_never_looks_ahead_across_series(
    spans: list[tuple[int, int]], window: int, val_fraction: float, test_fraction: float
) -> None:
    series = row_numbered_series(spans, window + 3)  # series overlapping in time in every way
    refusal: str | None = None
    try:
        split = chronological_split(
            series, val_fraction, test_fraction, window, split_by="time", skip_uncovered=True
        )
    except DataError as exc:
        refusal = str(exc)  # allowed only when no series is left, which says so
    if refusal is not None:
        assert "no series has a target in each period" in refusal
        return
    assert split.train.target_ts.max() < split.val.target_ts.min()
    assert split.val.target_ts.max() < split.test.target_ts.min()
    for k, cut in enumerate(split.cuts):
        rows = [p.series_index == k for p in (split.train, split.val, split.test)]
        assert [int(r.sum()) for r in rows] == [cut.train, cut.val, cut.test]
        assert min(cut.train, cut.val, cut.test) >= 1
        used = np.concatenate(
            [p.targets[r] for p, r in zip((split.train, split.val, split.test), rows, strict=True)]
        )
        np.testing.assert_array_equal(used, cut.series.prices[window:])  # each target once


def between(series: PriceSeries, start: str, stop: str) -> PriceSeries:
    """The rows of a real series from ``start`` up to (not including) ``stop``."""
    lo, hi = (int(pd.Timestamp(day, tz="UTC").timestamp() * 1000) for day in (start, stop))
    rows = (series.ts >= lo) & (series.ts < hi)
    return PriceSeries(series.symbol, series.source, series.ts[rows], series.prices[rows])


def test_a_common_time_split_keeps_time_order_across_series(
    nasdaq: PriceSeries, goog: PriceSeries
) -> None:
    """Two real series over different years (NASDAQ 2002 to mid-2012, GOOG 2004 to 2013):
    cut each by its own length, GOOG's validation period starts before NASDAQ's training
    data ends; cut at common event times, every training target of either series comes before
    every validation target of both, and validation before test."""
    both = [between(nasdaq, "2002-01-01", "2012-06-01"), goog]
    own = chronological_split(both, window_length=60)
    assert own.train.target_ts.max() > own.val.target_ts.min()  # look-ahead across series

    split = chronological_split(both, window_length=60, split_by="time")
    assert split.train.target_ts.max() < split.val.target_ts.min()
    assert split.val.target_ts.max() < split.test.target_ts.min()
    for k, (one, cut) in enumerate(zip(both, split.cuts, strict=True)):
        assert cut.series is one and min(cut.train, cut.val, cut.test) >= 1
        assert cut.train + cut.val + cut.test == len(one) - 60  # every target once
        test_ts = split.test.target_ts[split.test.series_index == k]
        assert test_ts[-1] == one.ts[-1]  # the test period runs to each series' end
    # The shares are of the time both cover: validation from 70 % of it, test from 85 %.
    first = min(int(one.ts[60]) for one in both)
    span = max(int(one.ts[-1]) for one in both) - first + 1
    val_from, test_from = first + int(0.70 * span), first + int(0.85 * span)
    assert split.train.target_ts.max() < val_from <= split.val.target_ts.min()
    assert split.val.target_ts.max() < test_from <= split.test.target_ts.min()


def test_a_symbol_ticking_much_faster_does_not_move_the_common_cuts(goog: PriceSeries) -> None:
    """Real GOOG closes, one a day, and a second symbol that ticks every minute over GOOG's
    last days only (real EURUSD prices; the minute spacing is put on them here: no bundled
    series has such a burst). The cuts are shares of the time covered, so the newcomer has
    no training target and is the one left out, however many ticks it has."""
    (eurusd,) = load_series("dataset:eurusd")
    end = int(goog.ts[-1])
    minutes = end - 60_000 * np.arange(len(eurusd))[::-1]
    burst = PriceSeries("BURST", "eurusd re-stamped", minutes, eurusd.prices)
    assert len(burst) > len(goog) and burst.ts[0] > goog.ts[-25]
    split = chronological_split(
        [goog, burst], window_length=60, split_by="time", skip_uncovered=True
    )
    assert [cut.series.symbol for cut in split.cuts] == ["GOOG"]
    with pytest.raises(DataError, match=r"\(BURST\) has no training or validation target"):
        chronological_split([goog, burst], window_length=60, split_by="time")


def test_a_series_outside_a_period_of_the_time_split_is_an_error_or_left_out(
    nasdaq: PriceSeries, goog: PriceSeries
) -> None:
    """GOOG ends in 2013, before the test period of NASDAQ 1999-2018 + GOOG begins."""
    with pytest.raises(DataError, match=r"dataset:goog \(GOOG\) has no test target"):
        chronological_split([nasdaq, goog], window_length=60, split_by="time")
    split = chronological_split(
        [nasdaq, goog], window_length=60, split_by="time", skip_uncovered=True
    )
    assert [cut.series.symbol for cut in split.cuts] == ["NASDAQ"]
    assert set(np.unique(split.train.series_index)) == {0}
    # 200 early targets and 86 late ones: validation starts at the late series' first
    # target, so the early one has no validation target and the late one no training one.
    early = PriceSeries("GOOG", "t", goog.ts[:260], goog.prices[:260])
    late = PriceSeries("NASDAQ", "t", nasdaq.ts[-146:], nasdaq.prices[-146:])
    with pytest.raises(DataError, match="no series has a target in each period"):
        chronological_split([early, late], window_length=60, split_by="time", skip_uncovered=True)


@pytest.mark.parametrize(
    ("scale", "message"),
    [
        (1_000_000, "microseconds or nanoseconds"),  # ns
        (1_000, "microseconds or nanoseconds"),  # us
        (1 / 1000, "epoch seconds"),  # s
    ],
)
def test_a_long_tables_ts_in_another_unit_is_a_clear_error(
    tmp_path: Path, scale: float, message: str
) -> None:
    """Nanoseconds trained a whole run, then failed writing the checkpoint's date range;
    seconds were read as milliseconds in 1970."""
    goog = load_series("dataset:goog")[0]
    ts = (goog.ts[:100] * scale).astype(np.int64)
    pd.DataFrame({"symbol": "GOOG", "ts": ts, "price": goog.prices[:100]}).to_csv(
        tmp_path / "ticks.csv", index=False
    )
    with pytest.raises(DataError, match=message):
        load_series(str(tmp_path / "ticks.csv"))


def test_yyyymmdd_dates_in_a_float_column_are_dates(tmp_path: Path) -> None:
    """A missing value makes pandas read the Date column as floats (20240131.0): still
    dates, not epoch milliseconds in 1970."""
    frame = seed_layout_csv(tmp_path / "a.csv")
    frame["Date"] = frame["Date"].str.replace("-", "").astype(float)
    frame.to_csv(tmp_path / "qqq.csv", index=False)
    (series,) = load_series(str(tmp_path / "qqq.csv"))
    assert series.iso_range()[0] == "1999-01-04T00:00:00+00:00"


def test_a_parquet_file_with_a_datetime_index_loads(tmp_path: Path) -> None:
    """What ``df.to_parquet()`` writes for a frame indexed by date (yfinance's layout)."""
    frame = seed_layout_csv(tmp_path / "a.csv")
    indexed = frame.assign(Date=pd.to_datetime(frame["Date"])).set_index("Date")
    indexed.to_parquet(tmp_path / "qqq.parquet")
    (series,) = load_series(str(tmp_path / "qqq.parquet"))
    assert series.iso_range()[0] == "1999-01-04T00:00:00+00:00"
    np.testing.assert_array_equal(series.prices, frame["Close"].to_numpy())
