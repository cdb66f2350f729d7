"""Real price data shared by the unit tests (loaded once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.data import PriceSeries, load_series


@pytest.fixture(scope="session")
def goog() -> PriceSeries:
    return load_series("dataset:goog")[0]


@pytest.fixture(scope="session")
def nasdaq() -> PriceSeries:
    return load_series("dataset:nasdaq")[0]


@pytest.fixture(scope="session")
def goog_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The last 400 real GOOG daily bars in the seed's CSV layout."""
    from backtesting.test import GOOG

    frame = GOOG.iloc[-400:].rename_axis("Date").reset_index()
    frame["Adj Close"] = frame["Close"]
    path = tmp_path_factory.mktemp("data") / "goog.csv"
    frame[["Date", "Open", "High", "Low", "Close", "Adj Close", "Volume"]].to_csv(path, index=False)
    return path
