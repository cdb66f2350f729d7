"""Predictor on CPU: the fast path and nn.GRU agree, the contract of predict() holds."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from daemon.predictor import Predictor, load_predictor, resolve_device
from model.checkpoint import CheckpointError, load_latest, read_latest
from model.data import load_series, make_windows
from model.gru import predict_prices
from tests.support.daemon import make_checkpoint

CPU = torch.device("cpu")


@pytest.fixture
def checkpoint_dir(tmp_path: Path) -> Path:
    make_checkpoint(tmp_path)
    return tmp_path


@functools.cache
def nasdaq_prices() -> np.ndarray:
    return load_series("dataset:nasdaq")[0].prices


def price_windows(n: int, start: int = 0) -> np.ndarray:
    """``n`` consecutive 60-day windows of the real NASDAQ closes from row ``start``, each
    scaled to open at 100, so the tolerances below are in dollars at a ~100 price level."""
    windows, _ = make_windows(nasdaq_prices()[start : start + n + 60], 60)
    assert len(windows) == n
    return 100.0 * windows / windows[:, :1]


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
    out = predictor.predict(np.full((2, 60), 250.0))  # synthetic: real series are never flat
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, 250.0, rtol=1e-3)


def test_self_test_refuses_non_finite_models(checkpoint_dir: Path) -> None:
    checkpoint = load_latest(checkpoint_dir)
    with torch.no_grad():
        checkpoint.model.head.bias.fill_(float("nan"))
    with pytest.raises(CheckpointError, match="non-finite"):
        Predictor(checkpoint, CPU).self_test()


def test_concurrent_callers_each_get_their_own_answers(checkpoint_dir: Path) -> None:
    """Several inference workers call predict() at once (the cell loop keeps no state
    between calls, and runs without the GIL, so calls overlap): each thread, on its own
    windows, gets what one thread alone gets for them, call after call."""
    predictor = Predictor(load_latest(checkpoint_dir), CPU)
    assert predictor.path == "scripted-cell"
    inputs = [price_windows(200 + 37 * k, start=1000 * k) for k in range(4)]
    expected = [predictor.predict(windows) for windows in inputs]
    barrier = threading.Barrier(len(inputs))
    results: list[list[np.ndarray]] = [[] for _ in inputs]

    def worker(k: int) -> None:
        barrier.wait()
        for _ in range(10):
            results[k].append(predictor.predict(inputs[k]))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k, got in enumerate(results):
        assert len(got) == 10
        for one in got:
            assert one.shape == expected[k].shape
            # A mix-up with another thread's rows would be off by dollars, not by rounding.
            np.testing.assert_allclose(one, expected[k], rtol=0, atol=1e-4)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    if torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cuda")
        assert resolve_device("cuda").type == "cuda"
    else:
        assert resolve_device("auto") == CPU
        with pytest.raises(RuntimeError, match="no CUDA"):
            resolve_device("cuda")
