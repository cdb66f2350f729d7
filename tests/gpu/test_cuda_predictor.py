"""The CUDA serving path: buckets, pinned buffers, CUDA graphs. Skipped only without CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from daemon.predictor import CUDA_BUCKETS, Predictor
from model.checkpoint import load_latest
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


def windows(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 100.0 * np.exp(np.cumsum(rng.normal(0, 0.01, (n, 60)), axis=1))


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
    """Issue 8: at least 1,000,000 windows/s on a data-centre GPU (printed, loosely bound)."""
    import time

    predictor = Predictor(load_latest(checkpoint_dir, "cuda"), torch.device("cuda"))
    batch = windows(CUDA_BUCKETS[-1])
    predictor.predict(batch)
    started, n = time.perf_counter(), 0
    while time.perf_counter() - started < 2.0:
        predictor.predict(batch)
        n += len(batch)
    rate = n / (time.perf_counter() - started)
    print(f"CUDA ceiling incl. host copies: {rate:,.0f} windows/s")
    assert rate > 100_000
