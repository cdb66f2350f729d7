"""The model on its device: a batch of raw price windows in, next-price predictions out.

CPU: the explicit GRU-cell forward (:class:`model.fast_gru.FastGRUForward`, the same
weights as ``nn.GRU``, faster on small machines), optionally ``torch.compile``-d in the
background; ``fast=False`` serves ``nn.GRU`` itself.

CUDA: ``nn.GRU`` (cuDNN) with batch-size buckets: each bucket owns a pinned host buffer
and a device buffer allocated once, copies run ``non_blocking``, and scaling + forward +
unscaling of a bucket is captured once as a CUDA graph and replayed (one launch instead
of hundreds); when capture fails the same buffers serve an ordinary forward.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from model.fast_gru import CompileUnit, FastGRUForward
from model.features import as_price_tensor, scale_windows, unscale

logger = logging.getLogger(__name__)

# Powers of two: a batch is padded to at most twice its size, and few graphs are captured.
CUDA_BUCKETS = tuple(2**k for k in range(4, 17))  # 16 .. 65,536


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"TICKCAST_DEVICE={name} but no CUDA device is available")
    return device


@dataclass
class _CudaBucket:
    """Preallocated buffers (and maybe a captured graph) for batches of up to ``size``."""

    size: int
    host_in: torch.Tensor  # pinned [size, window] float64
    host_out: torch.Tensor  # pinned [size] float64
    device_in: torch.Tensor  # [size, window] float64
    device_out: torch.Tensor | None = None  # graph output (lives in the graph's pool)
    graph: torch.cuda.CUDAGraph | None = None
    graph_failed: bool = False


class Predictor:
    """Scores [batch, window] price arrays with one checkpoint on one device.

    Immutable once built: a model swap builds a new Predictor and the service replaces
    the reference between two batches, so no batch ever mixes two models. On CPU several
    inference workers call ``predict`` at once (the cell loop keeps no state between
    calls); CUDA and the compiled step are driven by one worker.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: torch.device,
        *,
        fast: bool = True,
        compile: CompileUnit | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        self.checkpoint = checkpoint
        self.device = device
        self.model = checkpoint.model.to(device).eval()
        self.window_length = checkpoint.meta.window_length
        self.compile = compile
        self.fast: FastGRUForward | None = None
        if fast and device.type == "cpu":
            self.fast = FastGRUForward(self.model, compile=compile)
        self.cuda_graphs = cuda_graphs
        self._buckets: dict[int, _CudaBucket] = {}
        self._lock = threading.Lock()  # guards lazy bucket creation only

    @property
    def version(self) -> str:
        return self.checkpoint.version

    @property
    def path(self) -> str:
        """The forward serving calls right now: nn.GRU, scripted-cell, compiled-step, ..."""
        if self.device.type == "cuda":
            return "cuda-graph" if self.cuda_graphs else "cuda"
        return self.fast.path if self.fast is not None else "nn.GRU"

    def predict(self, windows: np.ndarray) -> np.ndarray:
        """Next-price prediction (float64) for each row of ``windows`` (oldest price first)."""
        if windows.ndim != 2 or windows.shape[1] != self.window_length:
            raise ValueError(
                f"expected [batch, {self.window_length}] windows, got {tuple(windows.shape)}"
            )
        if self.device.type == "cuda":
            return self._predict_cuda(windows)
        with torch.inference_mode():
            scaled = scale_windows(as_price_tensor(windows))
            # The cell loop beats nn.GRU from one row up (1 thread: 0.9 vs 1.0 ms at 1
            # row, 2.3 vs 3.0 ms at 64, 6.2 vs 8.7 ms at 256), so it serves every batch.
            forward = self.model if self.fast is None else self.fast
            return unscale(forward(scaled.inputs), scaled).numpy()

    # ------------------------------------------------------------------ CUDA
    def _forward_prices(self, prices: torch.Tensor) -> torch.Tensor:
        scaled = scale_windows(prices)
        return unscale(self.model(scaled.inputs), scaled)

    def _bucket(self, rows: int) -> _CudaBucket:
        size = next((b for b in CUDA_BUCKETS if b >= rows), CUDA_BUCKETS[-1])
        bucket = self._buckets.get(size)
        if bucket is None:
            with self._lock:
                bucket = self._buckets.get(size)
                if bucket is None:
                    window = self.window_length
                    bucket = _CudaBucket(
                        size=size,
                        host_in=torch.empty((size, window), dtype=torch.float64).pin_memory(),
                        host_out=torch.empty(size, dtype=torch.float64).pin_memory(),
                        # Padding rows hold a flat window of ones: finite, never NaN.
                        device_in=torch.ones(
                            (size, window), dtype=torch.float64, device=self.device
                        ),
                    )
                    self._buckets[size] = bucket
        return bucket

    def _capture(self, bucket: _CudaBucket) -> None:
        """Capture scale + forward + unscale of this bucket as one CUDA graph."""
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(3):  # warm-up (cuDNN workspace, allocator) off the graph
                    self._forward_prices(bucket.device_in)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # A hot swap self-tests (and so captures) the new model in a loader thread
            # while the inference worker keeps serving: only this thread's calls must
            # keep off the GPU during the capture, not the whole process's.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                bucket.device_out = self._forward_prices(bucket.device_in)
            bucket.graph = graph
        except Exception as exc:  # capture is an optimisation; never fail a batch for it
            logger.warning("CUDA graph capture failed for batch %d: %s", bucket.size, exc)
            bucket.graph_failed = True
            bucket.device_out = None

    def _predict_cuda(self, windows: np.ndarray) -> np.ndarray:
        largest = CUDA_BUCKETS[-1]
        if len(windows) > largest:
            return np.concatenate(
                [
                    self._predict_cuda(windows[i : i + largest])
                    for i in range(0, len(windows), largest)
                ]
            )
        n = len(windows)
        bucket = self._bucket(n)
        with torch.inference_mode():
            bucket.host_in[:n].numpy()[:] = windows
            bucket.device_in[:n].copy_(bucket.host_in[:n], non_blocking=True)
            if self.cuda_graphs and bucket.graph is None and not bucket.graph_failed:
                self._capture(bucket)
            if bucket.graph is not None and bucket.device_out is not None:
                bucket.graph.replay()
                out = bucket.device_out[:n]
            else:
                out = self._forward_prices(bucket.device_in[:n])
            bucket.host_out[:n].copy_(out, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            return bucket.host_out[:n].numpy().copy()

    # ------------------------------------------------------------------ checks
    def self_test(self) -> None:
        """Refuse a model whose forward pass gives non-finite values on a fixed window."""
        ramp = np.linspace(100.0, 101.0, self.window_length)[None, :]
        zigzag = 50.0 + (np.arange(self.window_length) % 2)[None, :]
        out = self.predict(np.vstack([ramp, zigzag]))
        if not np.isfinite(out).all():
            raise CheckpointError(f"model {self.version} predicts non-finite values: {out}")


def load_predictor(
    version_dir: Path,
    device: torch.device,
    *,
    fast: bool = True,
    compile: CompileUnit | None = None,
) -> Predictor:
    """Load, validate and self-test one checkpoint version on ``device``."""
    predictor = Predictor(load_checkpoint(version_dir, device), device, fast=fast, compile=compile)
    predictor.self_test()
    return predictor
