"""Predictor on CPU: the fast path and nn.GRU agree, the contract of predict() holds."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from daemon.predictor import Predictor, load_predictor, resolve_device
from model.checkpoint import CheckpointError, load_latest, read_latest
from model.data import make_windows
from model.gru import predict_prices
from tests.support.daemon import make_checkpoint

CPU = torch.device("cpu")


@pytest.fixture
def checkpoint_dir(tmp_path: Path) -> Path:
    make_checkpoint(tmp_path)
    return tmp_path


def price_windows(n: int, seed: int = 0) -> np.ndarray:
    """Random-walk prices, cut into every full 60-step window."""
    rng = np.random.default_rng(seed)
    prices = 100.0 * np.exp(np.cumsum(rng.normal(0, 0.01, n + 60)))
    windows, _ = make_windows(prices, 60)
    return windows[:n]


def test_fast_path_matches_nn_gru(checkpoint_dir: Path) -> None:
    checkpoint = load_latest(checkpoint_dir)
    fast = Predictor(checkpoint, CPU)
    eager = Predictor(load_latest(checkpoint_dir), CPU, fast=False)
    assert fast.path == "scripted-cell"
    assert eager.path == "nn.GRU"
    windows = price_windows(500)
    got, expected = fast.predict(windows), eager.predict(windows)
    assert got.dtype == np.float64 and got.shape == (500,)
    # float32 rounding of the scaled output, times each window's span (~a few dollars)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    reference = predict_prices(checkpoint.model, windows).numpy()
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-4)


def test_predict_checks_the_shape(checkpoint_dir: Path) -> None:
    predictor = load_predictor(checkpoint_dir / str(read_latest(checkpoint_dir)), CPU)
    with pytest.raises(ValueError, match="expected"):
        predictor.predict(np.ones((3, 59)))
    with pytest.raises(ValueError, match="expected"):
        predictor.predict(np.ones(60))


def test_empty_and_single_row_batches(checkpoint_dir: Path) -> None:
    predictor = Predictor(load_latest(checkpoint_dir), CPU)
    assert predictor.predict(np.empty((0, 60))).shape == (0,)
    one = price_windows(1)
    np.testing.assert_allclose(
        predictor.predict(one), predict_prices(predictor.model, one).numpy(), atol=1e-4, rtol=0
    )


def test_flat_window_unscales_to_its_price(checkpoint_dir: Path) -> None:
    predictor = Predictor(load_latest(checkpoint_dir), CPU)
    out = predictor.predict(np.full((2, 60), 250.0))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, 250.0, rtol=1e-3)


def test_self_test_refuses_non_finite_models(checkpoint_dir: Path) -> None:
    checkpoint = load_latest(checkpoint_dir)
    with torch.no_grad():
        checkpoint.model.head.bias.fill_(float("nan"))
    with pytest.raises(CheckpointError, match="non-finite"):
        Predictor(checkpoint, CPU).self_test()


def test_one_worker_thread_at_a_time_gives_the_same_answers(checkpoint_dir: Path) -> None:
    """The service calls predict() from its single inference thread; results are stable."""
    predictor = Predictor(load_latest(checkpoint_dir), CPU)
    windows = price_windows(300)
    expected = predictor.predict(windows)
    results: list[np.ndarray] = []
    worker = threading.Thread(target=lambda: results.append(predictor.predict(windows)))
    worker.start()
    worker.join()
    np.testing.assert_array_equal(results[0], expected)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    if not torch.cuda.is_available():
        assert resolve_device("auto") == CPU
        with pytest.raises(RuntimeError, match="no CUDA"):
            resolve_device("cuda")
