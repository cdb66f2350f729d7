"""Real price series shared by the unit tests (loaded once per session)."""

from __future__ import annotations

import pytest

from model.data import PriceSeries, load_series


@pytest.fixture(scope="session")
def goog() -> PriceSeries:
    return load_series("dataset:goog")[0]


@pytest.fixture(scope="session")
def nasdaq() -> PriceSeries:
    return load_series("dataset:nasdaq")[0]
