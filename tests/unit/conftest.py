"""Fixtures shared by the unit tests: real price data (loaded once per session) and
daemons built but never started (no Kafka)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from daemon.metrics import DaemonMetrics
from daemon.service import TickcastService
from daemon.settings import Settings
from model.data import PriceSeries, load_series
from tests.support.daemon import make_checkpoint

ServiceFactory = Callable[..., TickcastService]


@pytest.fixture
async def service_factory(tmp_path: Path) -> AsyncIterator[ServiceFactory]:
    """``build(**settings)``: a TickcastService on CPU with a checkpoint in ``tmp_path`` and
    its own metrics registry, built but not started; its restore and inference threads are
    stopped after the test."""
    make_checkpoint(tmp_path)
    built: list[TickcastService] = []

    def build(**overrides: Any) -> TickcastService:
        settings = Settings(checkpoint_dir=tmp_path, device="cpu", **overrides)
        service = TickcastService(settings, DaemonMetrics(CollectorRegistry(), process=False))
        built.append(service)
        return service

    yield build
    for service in built:
        await service._cancel_restore()
        service._inference.shutdown()


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
