"""Walk-forward report: ``summarize`` aggregates and the ``format_walk_forward`` table.

The fold results are built by hand on real series (no training): each fold's forecast
moves a known fraction of the way from the last price to the actual next price, so every
error is a known multiple of the naive forecast's and the ratios are known exactly.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np
import pytest

from model.data import PriceSeries
from model.evaluate import evaluate_forecasts
from model.gru import ModelConfig, PriceGRU
from model.train import TrainResult
from model.walk_forward import FoldResult, format_walk_forward, summarize, walk_forward_splits

WINDOW = 10
MODEL = PriceGRU(ModelConfig(window_length=WINDOW, hidden_size=2))


def fold_results(series: Sequence[PriceSeries], fractions: Sequence[float]) -> list[FoldResult]:
    """Fold k predicts ``last + fractions[k] * (actual - last)``: error = (f - 1) x naive's."""
    splits = walk_forward_splits(series, len(fractions), window_length=WINDOW)
    folds = []
    for k, (split, fraction) in enumerate(zip(splits, fractions, strict=True), start=1):
        test = split.test
        predicted = test.last + fraction * (test.targets - test.last)
        training = TrainResult(
            MODEL, [], best_epoch=3 * k, best_val_loss=0.1, device="cpu", seconds=1.23456 * k
        )
        evaluation = evaluate_forecasts(test.targets, predicted, test.last)
        folds.append(FoldResult(k, split, training, predicted, evaluation))
    return folds


def iso(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC).isoformat()


# --------------------------------------------------------------------------- summarize


def test_fold_rows_describe_each_fold(goog: PriceSeries) -> None:
    folds = fold_results([goog], [0.5, 0.0, 0.25])
    rows = summarize(folds, [goog])["folds"]
    assert [row["fold"] for row in rows] == [1, 2, 3]
    for row, fold in zip(rows, folds, strict=True):
        split = fold.split
        assert row["train_windows"] == len(split.train)
        assert row["val_windows"] == len(split.val)
        assert row["test_windows"] == len(split.test)
        assert row["test_start"] == iso(int(split.test.target_ts[0]))
        assert row["test_end"] == iso(int(split.test.target_ts[-1]))
        assert row["best_epoch"] == fold.training.best_epoch
        assert row["seconds"] == round(fold.training.seconds, 3)
        for key in ("gru", "naive", "rmse_ratio"):
            assert row[key] == fold.evaluation[key]
    assert [row["rmse_ratio"] for row in rows] == pytest.approx([0.5, 1.0, 0.75])
    assert rows[0]["gru"]["directional_accuracy"] == 1.0  # half-way: always the right side
    assert rows[1]["gru"]["directional_accuracy"] == 0.0  # naive: never calls a direction


def test_test_blocks_follow_each_other(goog: PriceSeries) -> None:
    rows = summarize(fold_results([goog], [0.5, 0.5, 0.5]), [goog])["folds"]
    row_of = {iso(int(t)): i for i, t in enumerate(goog.ts)}
    for earlier, later in itertools.pairwise(rows):
        assert row_of[later["test_start"]] == row_of[earlier["test_end"]] + 1
    assert rows[-1]["test_end"] == iso(int(goog.ts[-1]))
    assert sum(row["test_windows"] for row in rows) == round((len(goog) - WINDOW) * 0.3)


def test_one_series_pools_all_folds(goog: PriceSeries) -> None:
    folds = fold_results([goog], [0.5, 0.0])
    summary = summarize(folds, [goog])
    figures = summary["series"]["GOOG"]
    moves = [f.split.test.targets - f.split.test.last for f in folds]
    squared = [float(np.sum(m**2)) for m in moves]
    n = sum(len(m) for m in moves)
    assert figures["windows"] == n
    assert figures["naive"]["rmse"] == pytest.approx(math.sqrt(sum(squared) / n))
    assert figures["gru"]["rmse"] == pytest.approx(math.sqrt((0.25 * squared[0] + squared[1]) / n))
    expected_ratio = math.sqrt((0.25 * squared[0] + squared[1]) / sum(squared))
    assert figures["rmse_ratio"] == pytest.approx(expected_ratio)
    moved = [int(np.count_nonzero(m)) for m in moves]
    assert figures["gru"]["directional_accuracy"] == pytest.approx(moved[0] / sum(moved))
    low, high = figures["rmse_ratio_ci95"]
    assert 0.5 <= low <= expected_ratio <= high <= 1.0
    dm = figures["diebold_mariano"]
    assert dm["n"] == n
    assert dm["statistic"] < 0 and dm["p_better"] < 0.05  # smaller errors, never larger


def test_one_series_overall_keeps_ratio_and_dm(goog: PriceSeries) -> None:
    summary = summarize(fold_results([goog], [0.5, 0.0]), [goog])
    overall, series = summary["overall"], summary["series"]["GOOG"]
    assert overall["windows"] == series["windows"]
    assert overall["rmse_ratio"] == pytest.approx(series["rmse_ratio"])
    assert overall["diebold_mariano"]["statistic"] == pytest.approx(
        series["diebold_mariano"]["statistic"]
    )
    assert overall["rmse_ratio_ci95"] == pytest.approx(series["rmse_ratio_ci95"])
    assert overall["gru"]["directional_accuracy"] == series["gru"]["directional_accuracy"]
    # Not scaled: the table prints overall beside the folds, in the same price units.
    assert overall["gru"]["rmse"] == pytest.approx(series["gru"]["rmse"])
    assert overall["naive"]["rmse"] == pytest.approx(series["naive"]["rmse"])


def test_several_series_are_scaled_before_pooling(goog: PriceSeries, nasdaq: PriceSeries) -> None:
    folds = fold_results([goog, nasdaq], [0.5, 0.0])
    summary = summarize(folds, [goog, nasdaq])
    assert set(summary["series"]) == {"GOOG", "NASDAQ"}
    actual = np.concatenate([f.split.test.targets for f in folds])
    last = np.concatenate([f.split.test.last for f in folds])
    predicted = np.concatenate([f.test_predicted for f in folds])
    which = np.concatenate([f.split.test.series_index for f in folds])
    scale = np.empty_like(actual)
    for index, symbol in enumerate(("GOOG", "NASDAQ")):
        rows = which == index
        assert summary["series"][symbol]["windows"] == int(rows.sum())
        naive = math.sqrt(float(np.mean((last[rows] - actual[rows]) ** 2)))
        assert summary["series"][symbol]["naive"]["rmse"] == pytest.approx(naive)
        scale[rows] = naive
    overall = summary["overall"]
    assert overall["windows"] == len(actual)
    assert overall["naive"]["rmse"] == pytest.approx(1.0)  # each series' naive RMSE is 1
    scaled = math.sqrt(float(np.mean(((predicted - actual) / scale) ** 2)))
    assert overall["rmse_ratio"] == pytest.approx(scaled)
    pooled = math.sqrt(float(np.sum((predicted - actual) ** 2) / np.sum((last - actual) ** 2)))
    assert overall["rmse_ratio"] != pytest.approx(pooled, rel=1e-3)  # NASDAQ would dominate


def test_fold_dates_come_from_the_first_series(goog: PriceSeries, nasdaq: PriceSeries) -> None:
    folds = fold_results([nasdaq, goog], [0.5, 0.5])
    rows = summarize(folds, [nasdaq, goog])["folds"]
    for row, fold in zip(rows, folds, strict=True):
        first = fold.split.test.target_ts[fold.split.test.series_index == 0]
        assert row["test_start"] == iso(int(first[0]))
        assert row["test_end"] == iso(int(first[-1]))
        assert row["test_windows"] == len(fold.split.test)  # both series' windows


# --------------------------------------------------------------------------- format


def test_table_shows_every_fold_and_the_overall_line(goog: PriceSeries) -> None:
    summary = summarize(fold_results([goog], [0.5, 0.0]), [goog])
    text = format_walk_forward(summary)
    lines = text.splitlines()
    assert lines[0] == "walk-forward, 2 fold(s) (model vs naive next = last):"
    assert "RMSE" in lines[1] and "naive RMSE" in lines[1] and "ratio" in lines[1]
    for row, line in zip(summary["folds"], lines[2:4], strict=True):
        assert line.split()[:4] == [
            "fold",
            str(row["fold"]),
            row["test_start"][:10],
            str(row["test_windows"]),
        ]
        assert f"{row['gru']['rmse']:.6g}" in line
        assert f"{row['naive']['rmse']:.6g}" in line
        assert f"{row['gru']['mae']:.6g}" in line
        assert line.endswith(f"{row['rmse_ratio']:.4f}")
    assert lines[2].split()[-2:] == ["1.000", "0.5000"]
    assert lines[3].split()[-2:] == ["0.000", "1.0000"]
    overall = summary["overall"]
    assert lines[4].split()[:2] == ["overall", str(overall["windows"])]
    assert "all:" not in text and "scaled" not in text  # one series: no per-series rows
    low, high = overall["rmse_ratio_ci95"]
    dm = overall["diebold_mariano"]
    assert lines[5] == (
        f"  ratio {overall['rmse_ratio']:.4f}, 95% block-bootstrap CI [{low:.4f}, {high:.4f}]; "
        f"Diebold-Mariano (HLN) vs naive: stat {dm['statistic']:.3f}, "
        f"p(better) {dm['p_better']:.3g}, p(two-sided) {dm['p_value']:.3g}"
    )
    assert len(lines) == 6


def test_table_with_several_series_adds_a_row_per_series(
    goog: PriceSeries, nasdaq: PriceSeries
) -> None:
    summary = summarize(fold_results([goog, nasdaq], [0.5, 0.0]), [goog, nasdaq])
    lines = format_walk_forward(summary).splitlines()
    for symbol in ("GOOG", "NASDAQ"):
        (line,) = [x for x in lines if x.startswith(f"  all: {symbol}")]
        figures = summary["series"][symbol]
        assert line.split()[2] == str(figures["windows"])
        assert line.endswith(f"{figures['rmse_ratio']:.4f}")
    assert "  overall (errors scaled by each series' naive RMSE):" in lines
    assert lines.index("  overall (errors scaled by each series' naive RMSE):") == len(lines) - 3


def test_table_says_n_a_for_missing_figures(goog: PriceSeries) -> None:
    summary = copy.deepcopy(summarize(fold_results([goog], [0.5]), [goog]))
    fold = summary["folds"][0]
    fold["gru"]["directional_accuracy"] = None  # every window flat
    fold["gru"]["rmse"] = math.inf
    fold["naive"]["rmse"] = math.nan
    line = format_walk_forward(summary).splitlines()[2]
    assert line.split()[4:8] == ["n/a", "n/a", f"{fold['gru']['mae']:.6g}", "n/a"]


def test_table_cuts_long_symbols_to_the_label_width(goog: PriceSeries) -> None:
    summary = summarize(fold_results([goog], [0.5]), [goog])
    summary["series"]["AVERYLONGSYMBOLNAME"] = summary["series"]["GOOG"]
    line = next(x for x in format_walk_forward(summary).splitlines() if "AVERY" in x)
    assert line.startswith("  all: AVERYLONGSY ")  # "all: " + 11 characters = 16
    assert "AVERYLONGSYM" not in line
