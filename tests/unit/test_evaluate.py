"""Forecast figures against the naive forecast, and the predictions picture."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from model.data import chronological_split, load_series
from model.evaluate import (
    MIN_SCALED_WINDOWS,
    evaluate_forecasts,
    evaluate_model,
    forecast_errors,
    naive_scale,
    plot_predictions,
)
from model.gru import ModelConfig, PriceGRU


@pytest.fixture(scope="module")
def eurusd_test() -> tuple[np.ndarray, np.ndarray]:
    """Held-out test windows of the real hourly EURUSD series."""
    split = chronological_split(load_series("dataset:eurusd")[0], window_length=30)
    return split.test.windows, split.test.targets


# Hand-checkable synthetic numbers: each row is one window's (last, actual, predicted).
def test_figures_by_hand() -> None:
    last = np.array([100.0, 100.0, 100.0, 100.0])
    actual = np.array([110.0, 90.0, 100.0, 105.0])
    predicted = np.array([104.0, 96.0, 103.0, 100.0])
    result = evaluate_forecasts(actual, predicted, last)
    gru, naive = result["gru"], result["naive"]
    errors = predicted - actual  # -6, 6, 3, -5
    assert gru["rmse"] == pytest.approx(math.sqrt((36 + 36 + 9 + 25) / 4))
    assert gru["mae"] == pytest.approx(5.0)
    assert gru["mape"] == pytest.approx(np.mean(np.abs(errors) / actual) * 100)
    # Row 3 did not move (left out); rows 1-2 called right; row 4 called "no move": a miss.
    assert result["flat_windows"] == 1
    assert gru["directional_accuracy"] == pytest.approx(2 / 3)
    assert naive["rmse"] == pytest.approx(math.sqrt((100 + 100 + 0 + 25) / 4))
    assert naive["directional_accuracy"] == 0.0
    assert result["rmse_ratio"] == pytest.approx(gru["rmse"] / naive["rmse"])
    assert result["windows"] == 4


def test_naive_against_itself_and_a_perfect_forecast(
    eurusd_test: tuple[np.ndarray, np.ndarray],
) -> None:
    windows, targets = eurusd_test
    last = windows[:, -1]
    naive = evaluate_forecasts(targets, last, last)
    assert naive["rmse_ratio"] == 1.0
    assert naive["gru"] == naive["naive"]
    assert naive["naive"]["rmse"] == pytest.approx(float(np.sqrt(np.mean((targets - last) ** 2))))
    perfect = evaluate_forecasts(targets, targets, last)
    assert perfect["rmse_ratio"] == 0.0
    assert perfect["gru"]["directional_accuracy"] == 1.0


def test_untrained_residual_model_scores_like_naive(
    eurusd_test: tuple[np.ndarray, np.ndarray],
) -> None:
    windows, targets = eurusd_test
    result = evaluate_model(
        PriceGRU(ModelConfig(hidden_size=16, window_length=30)), windows, targets
    )
    assert result["rmse_ratio"] == pytest.approx(1.0, abs=1e-5)


# Synthetic: a stretch where the price never moves.
def test_all_flat() -> None:
    flat = np.full(3, 50.0)
    result = evaluate_forecasts(flat, flat + 1.0, flat)
    assert result["gru"]["directional_accuracy"] is None
    assert result["rmse_ratio"] == math.inf
    assert evaluate_forecasts(flat, flat, flat)["rmse_ratio"] == 1.0


def test_shapes_must_agree() -> None:
    with pytest.raises(ValueError, match="one length"):
        evaluate_forecasts(np.ones(3), np.ones(2), np.ones(3))
    with pytest.raises(ValueError, match="no forecasts"):
        evaluate_forecasts(np.ones(0), np.ones(0), np.ones(0))


@pytest.mark.parametrize("with_time", [True, False])
def test_plot_predictions_writes_a_png(
    tmp_path: Path, eurusd_test: tuple[np.ndarray, np.ndarray], with_time: bool
) -> None:
    windows, targets = eurusd_test
    ts = load_series("dataset:eurusd")[0].ts[-len(targets) :] if with_time else None
    path = plot_predictions(
        tmp_path / "out" / "predictions.png", targets, windows[:, -1], last_n=200, ts=ts
    )
    assert path == tmp_path / "out" / "predictions.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["predictions.png"]
    assert path.stat().st_mode & 0o777 == 0o644  # readable like the checkpoint's other files


def test_float32_noise_around_the_last_price_is_no_direction_call() -> None:
    """A residual model with a zero correction is the naive forecast, but float32
    arithmetic moves it by ~1e-8 of the price: that must not count as calling a move."""
    last = np.array([100.0, 100.0, 100.0, 100.0])
    actual = np.array([101.0, 99.0, 101.0, 99.0])
    noise = last * np.array([1e-9, -1e-9, -5e-9, 5e-9])
    assert forecast_errors(actual, last + noise, last)["directional_accuracy"] == 0.0
    real_calls = last * np.array([1e-3, -1e-3, -1e-3, 1e-3])
    assert forecast_errors(actual, last + real_calls, last)["directional_accuracy"] == 0.5


def test_naive_scale_leaves_thin_and_flat_series_out_of_pooled_figures() -> None:
    """One test window of a quiet symbol (a tiny naive RMSE) would outweigh thousands of
    windows of the others; a flat one would mix price units in."""
    rng = np.random.default_rng(0)
    index = np.repeat([0, 1, 2], [MIN_SCALED_WINDOWS, 1, MIN_SCALED_WINDOWS])
    last = np.where(index == 2, 50.0, 100.0 + rng.normal(size=len(index)))
    targets = np.where(index == 2, 50.0, last + rng.normal(size=len(index)))
    scale = naive_scale(last, targets, index, several=True)
    assert np.isfinite(scale[index == 0]).all()
    assert np.isnan(scale[index != 0]).all()  # one window; never moved
    assert (naive_scale(last, targets, index, several=False) == 1.0).all()
    only_thin = naive_scale(last[index == 1], targets[index == 1], index[index == 1], several=True)
    assert (only_thin == 1.0).all()  # nothing to scale by: price units
