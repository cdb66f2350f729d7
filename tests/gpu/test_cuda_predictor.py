"""The CUDA serving path: buckets, pinned buffers, CUDA graphs. Skipped only without CUDA."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from daemon.predictor import CUDA_BUCKETS, Predictor
from model.checkpoint import load_latest
from model.data import load_series, make_windows
from model.gru import predict_prices
from tests.support.daemon import make_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.fixture
def checkpoint_dir(tmp_path: Path) -> Path:
    make_checkpoint(tmp_path)
    return tmp_path


@functools.cache
def real_windows() -> np.ndarray:
    """Every 60-step window of four bundled real series, each scaled to open at 100, so
    the tolerances below are in dollars at a ~100 price level (~17,000 windows)."""
    parts = [
        make_windows(load_series(f"dataset:{name}")[0].prices, 60)[0]
        for name in ("nasdaq", "sp500", "goog", "eurusd")
    ]
    windows = np.concatenate(parts)
    return 100.0 * windows / windows[:, :1]


def windows(n: int, seed: int = 0) -> np.ndarray:
    """``n`` real windows from offset ``1000 * seed``, wrapping round (the largest batch
    is four times the windows there are)."""
    pool = real_windows()
    return pool[(np.arange(n) + 1000 * seed) % len(pool)]


@pytest.mark.parametrize("cuda_graphs", [True, False])
@pytest.mark.parametrize("n", [1, 17, 1000, CUDA_BUCKETS[-1] + 5])
def test_cuda_matches_cpu_reference(checkpoint_dir: Path, cuda_graphs: bool, n: int) -> None:
    predictor = Predictor(
        load_latest(checkpoint_dir, "cuda"), torch.device("cuda"), cuda_graphs=cuda_graphs
    )
    batch = windows(n)
    expected = predict_prices(load_latest(checkpoint_dir).model, batch).numpy()
    for _ in range(2):  # the second call replays the captured graph
        got = predictor.predict(batch)
        assert got.dtype == np.float64 and got.shape == (n,)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)


def test_buckets_are_reused_and_graphs_captured(checkpoint_dir: Path) -> None:
    predictor = Predictor(load_latest(checkpoint_dir, "cuda"), torch.device("cuda"))
    first, second = windows(100, 1), windows(120, 2)
    predictor.predict(first)
    got = predictor.predict(second)  # same 128-row bucket, new data
    assert list(predictor._buckets) == [128]
    bucket = predictor._buckets[128]
    assert bucket.host_in.is_pinned() and bucket.host_out.is_pinned()
    assert bucket.graph is not None, "CUDA graph capture failed (see the warning log)"
    expected = predict_prices(load_latest(checkpoint_dir).model, second).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)


def test_ceiling_on_gpu(checkpoint_dir: Path) -> None:
    """Issue 8: full-size batches, back to back, stay right; the rate is printed, not
    asserted (tickcast bench measures throughput)."""
    import time

    predictor = Predictor(load_latest(checkpoint_dir, "cuda"), torch.device("cuda"))
    batch = windows(CUDA_BUCKETS[-1])
    expected = predict_prices(load_latest(checkpoint_dir).model, batch).numpy()
    predictor.predict(batch)
    calls = 20
    started = time.perf_counter()
    results = [predictor.predict(batch) for _ in range(calls)]
    rate = calls * len(batch) / (time.perf_counter() - started)
    print(f"CUDA ceiling incl. host copies: {rate:,.0f} windows/s over {calls} calls")
    for got in results:  # each call returns its own copy, replay after replay
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)
