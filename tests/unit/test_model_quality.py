"""Model quality figures: hand-checked statistics, naive-equivalence, the --walk-forward CLI."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from model.data import load_series
from model.evaluate import block_bootstrap_rmse_ratio, diebold_mariano
from model.gru import ModelConfig, PriceGRU, predict_prices
from model.retrain import run_retrain
from model.walk_forward import significance
from tests.support.retrain import FAST, parse

# Hand-checkable: model errors (1, -2, 3, 0) against naive errors (2, 2, 2, 2).
MODEL_ERRORS = np.array([1.0, -2.0, 3.0, 0.0])
NAIVE_ERRORS = np.array([2.0, 2.0, 2.0, 2.0])


def test_diebold_mariano_by_hand() -> None:
    # d = e_m^2 - e_n^2 = (-3, 0, 5, -4); mean -0.5; centred (-2.5, 0.5, 5.5, -3.5)
    # gamma_0 = 49 / 4 = 12.25; DM = -0.5 / sqrt(12.25 / 4) = -2/7
    # HLN, h = 1: DM * sqrt((4 + 1 - 2) / 4) = -2/7 * sqrt(3/4)
    result = diebold_mariano(MODEL_ERRORS, NAIVE_ERRORS)
    expected = -2 / 7 * math.sqrt(3 / 4)
    assert result.statistic == pytest.approx(expected)
    assert result.mean_loss_difference == pytest.approx(-0.5)
    assert result.p_better == pytest.approx(stats.t(df=3).cdf(expected))
    assert result.p_value == pytest.approx(2 * stats.t(df=3).sf(abs(expected)))
    # h = 2 adds 2 * gamma_1: gamma_1 = (0.5*-2.5 + 5.5*0.5 + -3.5*5.5) / 4 = -4.4375,
    # V = 12.25 - 8.875 = 3.375; DM = -0.5 / sqrt(3.375 / 4);
    # HLN: * sqrt((4 + 1 - 4 + 2/4) / 4) -> exactly -1/3.
    assert diebold_mariano(MODEL_ERRORS, NAIVE_ERRORS, horizon=2).statistic == pytest.approx(-1 / 3)


def test_significance_figures_by_hand() -> None:
    last = np.full(4, 100.0)
    actual = last - NAIVE_ERRORS  # naive errors are last - actual = 2 each
    predicted = actual + MODEL_ERRORS
    figures = significance(actual, predicted, last)
    assert figures["gru"]["rmse"] == pytest.approx(math.sqrt(14 / 4))
    assert figures["gru"]["mae"] == pytest.approx(6 / 4)
    assert figures["naive"]["rmse"] == pytest.approx(2.0)
    assert figures["rmse_ratio"] == pytest.approx(math.sqrt(14 / 4) / 2)
    assert figures["diebold_mariano"]["statistic"] == pytest.approx(-2 / 7 * math.sqrt(3 / 4))
    low, high = figures["rmse_ratio_ci95"]
    assert low < figures["rmse_ratio"] < high  # the CI brackets the point estimate
    assert json.loads(json.dumps(figures)) == figures  # goes into meta.json as is


def test_block_bootstrap() -> None:
    rng = np.random.default_rng(1)
    naive = rng.normal(size=300)
    assert block_bootstrap_rmse_ratio(naive, naive) == (1.0, 1.0)
    low, high = block_bootstrap_rmse_ratio(2 * naive, naive)
    assert low == pytest.approx(2.0) and high == pytest.approx(2.0)
    noisy = naive + rng.normal(scale=0.5, size=300)
    point = math.sqrt(np.mean(noisy**2) / np.mean(naive**2))
    low, high = block_bootstrap_rmse_ratio(noisy, naive, seed=3)
    assert low < point < high
    assert block_bootstrap_rmse_ratio(noisy, naive, seed=3) == (low, high)  # seeded


def test_identical_forecasts_are_no_evidence() -> None:
    result = diebold_mariano(NAIVE_ERRORS, NAIVE_ERRORS)
    assert (result.statistic, result.p_value, result.p_better) == (0.0, 1.0, 0.5)


@functools.cache
def nasdaq_prices() -> np.ndarray:
    return load_series("dataset:nasdaq")[0].prices


@settings(max_examples=25, deadline=None)
@given(
    hidden=st.integers(min_value=1, max_value=48),
    layers=st.integers(min_value=1, max_value=3),
    dropout=st.sampled_from([0.0, 0.3]),
    level=st.floats(min_value=1e-3, max_value=1e6),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_untrained_residual_model_is_exactly_naive(
    hidden: int, layers: int, dropout: float, level: float, seed: int
) -> None:
    torch.manual_seed(seed)
    config = ModelConfig(hidden_size=hidden, num_layers=layers, window_length=12, dropout=dropout)
    model = PriceGRU(config)
    # Five consecutive real NASDAQ 12-day windows, rescaled to open at an arbitrary
    # level: the property must hold at every price level, not only at the index's own.
    real = nasdaq_prices()
    start = seed % (len(real) - 60)
    windows = real[start : start + 60].reshape(5, 12)
    prices = level * windows / windows[:, :1]
    prices[0] = level  # a flat window too (synthetic: real series are never flat)
    predicted = predict_prices(model, prices).numpy()
    np.testing.assert_allclose(predicted, prices[:, -1], rtol=1e-6)


# --------------------------------------------------------------------------- CLI


def retrain(*argv: str) -> int:
    return run_retrain(parse(*argv))


def test_walk_forward_cli(
    goog_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = str(tmp_path / "ck")
    argv = ["--data", str(goog_csv), "--checkpoint-dir", ck, *FAST, "--walk-forward", "3"]
    assert retrain(*argv, "--json") == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    walk = report["walk_forward"]
    # 380 targets, the newest 30 % (114) tested in 3 blocks of 38.
    assert [f["test_windows"] for f in walk["folds"]] == [38, 38, 38]
    assert walk["overall"]["windows"] == 114
    assert [f["train_windows"] + f["val_windows"] for f in walk["folds"]] == [266, 304, 342]
    assert 0.5 < walk["overall"]["rmse_ratio"] < 2.0
    assert set(walk["overall"]["diebold_mariano"]) >= {"statistic", "p_value", "p_better"}
    # The candidate is the last fold's model, scored on the last fold's test block...
    assert report["evaluation"]["rmse_ratio"] == walk["folds"][-1]["rmse_ratio"]
    assert report["windows"]["test"] == 38
    meta = json.loads((Path(report["checkpoint"]) / "meta.json").read_text())
    assert meta["evaluation"]["walk_forward"]["overall"]["windows"] == 114
    # ...and so is the model in service when the gate compares the two.
    assert retrain(*argv, "--seed", "1") == 0
    text = capsys.readouterr().out
    assert "walk-forward, 3 fold(s)" in text
    assert "Diebold-Mariano (HLN)" in text
    assert "on the same 38 test windows" in text


def test_walk_forward_cli_errors(
    goog_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--data", str(goog_csv), "--checkpoint-dir", str(tmp_path), *FAST]
    assert retrain(*base, "--walk-forward", "0") == 2
    assert "--walk-forward must be at least 1" in capsys.readouterr().err
    assert retrain(*base, "--walk-forward", "2", "--walk-forward-span", "1.5") == 2
    assert "--walk-forward-span" in capsys.readouterr().err
    assert retrain(*base, "--walk-forward", "400") == 2
    assert "too few for 400 walk-forward folds" in capsys.readouterr().err
