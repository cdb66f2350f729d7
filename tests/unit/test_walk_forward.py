"""Walk-forward folds: time order, no leakage, exact coverage of the evaluated span."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.data import DataError, PriceSeries, load_series
from model.walk_forward import FoldBounds, fold_bounds, walk_forward_splits
from tests.support.series import SERIES_OFFSET, SPANS, row_numbered_series


def test_fold_bounds_by_hand() -> None:
    # 100 targets, the newest 30 tested in 2 blocks of 15; validation = 20 % of each fit.
    assert fold_bounds(100, 2, eval_fraction=0.3, val_fraction=0.2) == [
        FoldBounds(0, 56, 70, 85),
        FoldBounds(0, 68, 85, 100),
    ]
    # Rolling: every fold fits on 70 targets, the span just before its test block.
    assert fold_bounds(100, 2, eval_fraction=0.3, val_fraction=0.2, scheme="rolling") == [
        FoldBounds(0, 56, 70, 85),
        FoldBounds(15, 71, 85, 100),
    ]


def test_fold_bounds_refuse_what_cannot_work() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        fold_bounds(100, 0)
    with pytest.raises(ValueError, match="at least 2"):
        fold_bounds(5, 4, eval_fraction=0.9)
    with pytest.raises(ValueError, match="scheme"):
        fold_bounds(100, 2, scheme="sideways")  # type: ignore[arg-type]
    goog = load_series("dataset:goog")[0]
    short = PriceSeries(goog.symbol, goog.source, goog.ts[:12], goog.prices[:12])
    with pytest.raises(DataError, match="too few for 4 walk-forward folds"):
        walk_forward_splits([short], 4, window_length=10)


# Synthetic prices on purpose: price = 1 + row number (+ an offset per series), so every
# window and target reveals exactly which rows of which series it came from.
# The walk-forward knobs every property test varies (keyword arguments of the splits).
FOLD_OPTIONS = st.fixed_dictionaries(
    {
        "eval_fraction": st.floats(min_value=0.05, max_value=0.8),
        "val_fraction": st.floats(min_value=0.01, max_value=0.5),
        "scheme": st.sampled_from(["expanding", "rolling"]),
    }
)


@settings(max_examples=80, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=150), min_size=1, max_size=3),
    window=st.integers(min_value=1, max_value=20),
    folds=st.integers(min_value=1, max_value=6),
    options=FOLD_OPTIONS,
)
def test_walk_forward_never_leaks(
    lengths: list[int], window: int, folds: int, options: dict[str, Any]
) -> None:
    offset = SERIES_OFFSET
    eval_fraction = options["eval_fraction"]
    series = row_numbered_series([(0, extra) for extra in lengths], window + 2 * folds + 2)
    try:
        splits = walk_forward_splits(series, folds, window_length=window, **options)
    except DataError:
        # Only when a series really is too short for the requested test span.
        assert any(
            (len(s) - window) - max(folds, round((len(s) - window) * eval_fraction)) < 2
            for s in series
        )
        return
    assert len(splits) == folds
    tested: list[list[float]] = [[] for _ in series]
    for split in splits:
        for part in (split.train, split.val, split.test):
            assert len(part) >= 1
            rows = part.windows - 1.0 - part.series_index[:, None] * offset
            target_rows = part.targets - 1.0 - part.series_index * offset
            # Each window is the rows just before its target, oldest first, same series.
            np.testing.assert_array_equal(rows, target_rows[:, None] - np.arange(window, 0, -1))
        for k in range(len(series)):
            train, val, test = (
                p.targets[p.series_index == k] for p in (split.train, split.val, split.test)
            )
            train_windows = split.train.windows[split.train.series_index == k]
            val_windows = split.val.windows[split.val.series_index == k]
            assert min(len(train), len(val), len(test)) >= 1
            # Time order: train < validation < test, for targets...
            assert train.max() < val.min() and val.max() < test.min()
            # ...and no price a model fits on (window or target) is a test target or later.
            assert train_windows.max() < test.min() and val_windows.max() < test.min()
            tested[k].extend(test.tolist())
            cut = split.cuts[k]
            assert (cut.train, cut.val, cut.test) == (len(train), len(val), len(test))
    for k, one in enumerate(series):
        # The test blocks cover the newest span exactly once, in order, without gaps.
        block = np.array(tested[k])
        np.testing.assert_array_equal(block, one.prices[len(one) - len(block) :])


@settings(max_examples=80, deadline=None)
@given(
    spans=SPANS,
    window=st.integers(min_value=1, max_value=20),
    folds=st.integers(min_value=1, max_value=5),
    options=FOLD_OPTIONS,
)
def test_walk_forward_at_common_times_never_looks_ahead_across_series(
    spans: list[tuple[int, int]], window: int, folds: int, options: dict[str, Any]
) -> None:
    series = row_numbered_series(spans, window + 2 * folds + 2)
    refusal: str | None = None
    try:
        splits = walk_forward_splits(
            series, folds, window_length=window, split_by="time", skip_uncovered=True, **options
        )
    except DataError as exc:
        refusal = str(exc)  # allowed only when no series is left, or too few targets
    if refusal is not None:
        assert "no series has a target" in refusal or "too few targets" in refusal
        return
    kept = [cut.series.symbol for cut in splits[0].cuts]
    for split in splits:
        assert [cut.series.symbol for cut in split.cuts] == kept  # the same series in every fold
        # Across all series: training < validation < test in event time.
        assert split.train.target_ts.max() < split.val.target_ts.min()
        assert split.val.target_ts.max() < split.test.target_ts.min()
        for k, cut in enumerate(split.cuts):
            counts = [
                int((p.series_index == k).sum()) for p in (split.train, split.val, split.test)
            ]
            assert counts == [cut.train, cut.val, cut.test] and min(counts) >= 1
    for earlier, later in itertools.pairwise(splits):
        assert earlier.test.target_ts.max() < later.test.target_ts.min()  # blocks in order
    for k, symbol in enumerate(kept):
        one = next(s for s in series if s.symbol == symbol)
        assert splits[-1].test.target_ts[splits[-1].test.series_index == k][-1] == one.ts[-1]


def test_walk_forward_at_common_times_on_real_series(
    nasdaq: PriceSeries, goog: PriceSeries
) -> None:
    """Real NASDAQ (2002 to mid-2012) and GOOG (2004 to 2013): the folds' boundaries are
    the same event times for both; GOOG alone fails when NASDAQ runs to 2018."""
    rows = (nasdaq.ts >= goog.ts[0] - 2 * 365 * 86_400_000) & (nasdaq.ts < 1_338_508_800_000)
    early_nasdaq = PriceSeries("NASDAQ", "t", nasdaq.ts[rows], nasdaq.prices[rows])
    splits = walk_forward_splits([early_nasdaq, goog], 3, split_by="time")
    for split in splits:
        assert split.train.target_ts.max() < split.val.target_ts.min()
        assert split.val.target_ts.max() < split.test.target_ts.min()
    own = walk_forward_splits([early_nasdaq, goog], 3)
    assert any(s.train.target_ts.max() > s.val.target_ts.min() for s in own)
    with pytest.raises(DataError, match=r"GOOG\) has no .*target.*common to all series"):
        walk_forward_splits([nasdaq, goog], 3, split_by="time")


def test_walk_forward_summary_covers_the_series_kept(
    nasdaq: PriceSeries, goog: PriceSeries
) -> None:
    """A common time split that leaves a series out: the folds train on the rest and the
    summary lists the series kept (it once mapped fold rows to the series given)."""
    from model.gru import ModelConfig
    from model.train import TrainConfig
    from model.walk_forward import run_walk_forward

    stopped = PriceSeries("STOPPED", "t", nasdaq.ts[:300], nasdaq.prices[:300])  # 1999-2000
    late = PriceSeries("GOOG", "t", goog.ts, goog.prices)  # 2004-2013
    span = PriceSeries("NASDAQ", "t", nasdaq.ts[:3600], nasdaq.prices[:3600])  # 1999-2013
    result = run_walk_forward(
        [stopped, late, span],
        2,
        ModelConfig(hidden_size=4, window_length=20),
        TrainConfig(epochs=1, batch_size=512),
        split_by="time",
        skip_uncovered=True,
        progress=False,
    )
    assert [cut.series.symbol for cut in result.final.split.cuts] == ["GOOG", "NASDAQ"]
    assert sorted(result.summary["series"]) == ["GOOG", "NASDAQ"]
    for symbol in ("GOOG", "NASDAQ"):
        assert result.summary["series"][symbol]["windows"] > 0
