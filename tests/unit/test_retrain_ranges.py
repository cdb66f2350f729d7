"""The data ranges a checkpoint records: ``training_ranges`` and ``held_out_ranges``.

Per series, the fitting rows (training and validation windows and targets) are a prefix
of the rows the split used, and the held-out rows are its test targets; together they
cover those rows exactly once. Checked on real series, for a chronological split and for
walk-forward folds (whose series are slices of the originals).
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.checkpoint import DataRange
from model.data import ChronologicalSplit, PriceSeries, chronological_split, load_series
from model.retrain import held_out_ranges, training_ranges
from model.walk_forward import walk_forward_splits


@cache
def eurusd() -> PriceSeries:
    return load_series("dataset:eurusd")[0]


def iso(epoch_ms: int | np.integer) -> str:
    return datetime.fromtimestamp(int(epoch_ms) / 1000, tz=UTC).isoformat()


def row_of(series: PriceSeries, stamp: str) -> int:
    (rows,) = np.flatnonzero(series.ts == int(datetime.fromisoformat(stamp).timestamp() * 1000))
    return int(rows)


def test_ranges_of_a_chronological_split_by_hand(goog: PriceSeries) -> None:
    split = chronological_split(goog, 0.15, 0.15, window_length=60)
    test = round((len(goog) - 60) * 0.15)
    assert training_ranges(split) == [
        DataRange(
            source="dataset:goog",
            symbol="GOOG",
            start=iso(goog.ts[0]),
            end=iso(goog.ts[len(goog) - test - 1]),
            rows=len(goog) - test,
        )
    ]
    assert held_out_ranges(split) == [
        DataRange(
            source="dataset:goog",
            symbol="GOOG",
            start=iso(goog.ts[len(goog) - test]),
            end=iso(goog.ts[-1]),
            rows=test,
        )
    ]


def test_held_out_rows_are_the_test_targets(goog: PriceSeries) -> None:
    split = chronological_split(goog, 0.1, 0.2, window_length=30)
    (held,) = held_out_ranges(split)
    assert held.rows == len(split.test)
    assert (held.start, held.end) == (
        iso(split.test.target_ts[0]),
        iso(split.test.target_ts[-1]),
    )


def test_training_ends_with_the_last_validation_target(goog: PriceSeries) -> None:
    split = chronological_split(goog, 0.1, 0.2, window_length=30)
    (trained,) = training_ranges(split)
    assert trained.end == iso(split.val.target_ts[-1])
    assert trained.start == iso(goog.ts[0])  # the first training window's oldest price
    assert trained.end < held_out_ranges(split)[0].start


def check_partition(split: ChronologicalSplit, originals: list[PriceSeries]) -> None:
    """Per series: the fitting rows, then the held-out rows, end to end and in order."""
    trained, held = training_ranges(split), held_out_ranges(split)
    assert len(trained) == len(held) == len(split.cuts) == len(originals)
    for fit, test, cut, original in zip(trained, held, split.cuts, originals, strict=True):
        assert (fit.symbol, fit.source) == (test.symbol, test.source)
        assert (fit.symbol, fit.source) == (original.symbol, original.source)
        assert fit.rows + test.rows == len(cut.series)
        assert test.rows == cut.test
        assert row_of(original, fit.start) + fit.rows - 1 == row_of(original, fit.end)
        assert row_of(original, fit.end) + 1 == row_of(original, test.start)
        assert row_of(original, test.start) + test.rows - 1 == row_of(original, test.end)


def test_one_range_per_series_in_order(goog: PriceSeries, nasdaq: PriceSeries) -> None:
    split = chronological_split([nasdaq, goog], window_length=20)
    assert [r.symbol for r in training_ranges(split)] == ["NASDAQ", "GOOG"]
    assert [r.symbol for r in held_out_ranges(split)] == ["NASDAQ", "GOOG"]
    check_partition(split, [nasdaq, goog])
    # Each series is cut by its own length.
    assert [r.rows for r in held_out_ranges(split)] == [
        round((len(nasdaq) - 20) * 0.15),
        round((len(goog) - 20) * 0.15),
    ]


def test_smallest_split_one_row_each(goog: PriceSeries) -> None:
    short = PriceSeries("GOOG", "dataset:goog", goog.ts[:13], goog.prices[:13])
    split = chronological_split(short, 0.15, 0.15, window_length=10)
    (fit,), (test,) = training_ranges(split), held_out_ranges(split)
    assert (fit.rows, test.rows) == (12, 1)
    assert test.start == test.end == iso(goog.ts[12])
    assert fit.end == iso(goog.ts[11])


@pytest.mark.parametrize("scheme", ["expanding", "rolling"])
def test_walk_forward_folds_record_their_own_rows(goog: PriceSeries, scheme: str) -> None:
    window = 20
    splits = walk_forward_splits([goog], 3, window_length=window, scheme=scheme)  # type: ignore[arg-type]
    previous_end = None
    for split in splits:
        (fit,), (test,) = training_ranges(split), held_out_ranges(split)
        check_partition(split, [goog])
        assert test.start == iso(split.test.target_ts[0])
        assert test.end == iso(split.test.target_ts[-1])
        assert fit.end == iso(split.val.target_ts[-1])
        # The fitting rows start at the first training window's oldest price.
        first_window = split.train.windows[0]
        start = row_of(goog, fit.start)
        np.testing.assert_array_equal(goog.prices[start : start + window], first_window)
        if previous_end is not None:  # the test blocks follow each other
            assert row_of(goog, test.start) == row_of(goog, previous_end) + 1
        previous_end = test.end
    starts = [training_ranges(s)[0].start for s in splits]
    if scheme == "expanding":
        assert starts == [iso(goog.ts[0])] * 3
    else:
        assert starts[0] == iso(goog.ts[0]) and starts[0] < starts[1] < starts[2]
        assert len({training_ranges(s)[0].rows for s in splits}) == 1  # same fitting span


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(min_value=40, max_value=400),
    window=st.integers(min_value=2, max_value=30),
    val_fraction=st.floats(min_value=0.01, max_value=0.45),
    test_fraction=st.floats(min_value=0.01, max_value=0.45),
)
def test_ranges_partition_the_rows(
    rows: int, window: int, val_fraction: float, test_fraction: float
) -> None:
    full = eurusd()
    series = PriceSeries(full.symbol, full.source, full.ts[:rows], full.prices[:rows])
    split = chronological_split(series, val_fraction, test_fraction, window_length=window)
    check_partition(split, [series])
    assert training_ranges(split)[0].start == iso(series.ts[0])
    assert held_out_ranges(split)[0].end == iso(series.ts[-1])
