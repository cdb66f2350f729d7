"""The model on its device: a batch of raw price windows in, next-price predictions out."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from model.features import scale_windows, unscale

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"TICKCAST_DEVICE={name} but no CUDA device is available")
    return device


class Predictor:
    """Scores [batch, window] price arrays with one checkpoint on one device.

    Immutable once built: a model swap builds a new Predictor and the service replaces
    the reference between two batches, so no batch ever mixes two models.
    """

    def __init__(self, checkpoint: Checkpoint, device: torch.device) -> None:
        self.checkpoint = checkpoint
        self.device = device
        self.model = checkpoint.model.to(device).eval()
        self.window_length = checkpoint.meta.window_length

    @property
    def version(self) -> str:
        return self.checkpoint.version

    def predict(self, windows: np.ndarray) -> np.ndarray:
        """Next-price prediction (float64) for each row of ``windows`` (oldest price first)."""
        if windows.ndim != 2 or windows.shape[1] != self.window_length:
            raise ValueError(
                f"expected [batch, {self.window_length}] windows, got {tuple(windows.shape)}"
            )
        with torch.inference_mode():
            prices = torch.from_numpy(np.ascontiguousarray(windows, np.float64))
            if self.device.type == "cuda":
                prices = prices.pin_memory().to(self.device, non_blocking=True)
            scaled = scale_windows(prices)
            predicted = unscale(self.model(scaled.inputs), scaled)
            return predicted.cpu().numpy()

    def self_test(self) -> None:
        """Refuse a model whose forward pass gives non-finite values on a fixed window."""
        ramp = np.linspace(100.0, 101.0, self.window_length)[None, :]
        zigzag = 50.0 + (np.arange(self.window_length) % 2)[None, :]
        out = self.predict(np.vstack([ramp, zigzag]))
        if not np.isfinite(out).all():
            raise CheckpointError(f"model {self.version} predicts non-finite values: {out}")


def load_predictor(version_dir: Path, device: torch.device) -> Predictor:
    """Load, validate and self-test one checkpoint version on ``device``."""
    predictor = Predictor(load_checkpoint(version_dir, device), device)
    predictor.self_test()
    return predictor
