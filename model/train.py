"""Fitting a :class:`PriceGRU`: Adam on the MSE of per-window-scaled next prices.

The windows and targets are scaled by :mod:`model.features`, the same functions serving
uses. Training is seeded and deterministic; early stopping watches the validation loss
and the best weights are kept. Epoch 0 in the history is the model before any update,
which for the residual head is exactly the naive forecast: if no epoch beats it, the
untouched model is what comes back.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm import tqdm

from model.features import scale_targets, scale_windows
from model.gru import ModelConfig, PriceGRU

logger = logging.getLogger(__name__)

# Windows per forward pass when only scoring (no gradients). A pass over 8,192 windows held
# ~450 MiB of GRU workspace, the retrain's peak; 1,024 holds about an eighth and ran 1.7-1.9x faster
# on 2 cores (model.evaluate.PREDICT_BATCH_SIZE likewise).
EVAL_BATCH_SIZE = 1024
# Windows scaled at once: scaling holds several float64 copies of what it scales.
SCALE_CHUNK = 65_536


class TrainConfig(BaseModel):
    """How to fit a model; model architecture lives in :class:`ModelConfig`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(default=30, ge=1)
    batch_size: int = Field(default=256, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    patience: int = Field(default=5, ge=1)
    seed: int = 0
    device: str = "auto"
    # Clip the gradient norm: a GRU's rare exploding step would otherwise undo an epoch.
    grad_clip: float | None = Field(default=1.0, gt=0)
    # CPU threads; None = the CPUs this process may run on (not the machine's total).
    num_threads: int | None = Field(default=None, ge=1)
    # "scaled": MSE of per-window-scaled prices, so a calm window (small span) weighs as
    # much as a wild one. "relative": each window's squared error is weighted by
    # (span / last price)^2, i.e. the squared error as a fraction of the price; this is
    # closer to the price-unit RMSE the model is judged by, and still scale-free across
    # symbols. Weights are normalised to mean 1 on the training windows. The retrain job
    # uses "relative" (it won on the development walk-forward, README.md, "Model quality").
    loss: Literal["scaled", "relative"] = "scaled"
    # Stop this many seconds into training, within an epoch if need be (the cut epoch is
    # scored like any other), keeping the best epoch so far: bounds a scheduled retrain's
    # time on a slow or busy node. Where it stops then depends on the machine's speed, so
    # such runs do not repeat exactly.
    max_seconds: float | None = Field(default=None, gt=0)


@dataclass(frozen=True)
class EpochLoss:
    epoch: int
    train_loss: float
    val_loss: float


@dataclass(frozen=True)
class TrainResult:
    model: PriceGRU  # the best weights, in eval mode, on the training device
    history: list[EpochLoss]  # epoch 0 = before training
    best_epoch: int
    best_val_loss: float
    device: str
    seconds: float
    out_of_time: bool = False  # stopped by max_seconds before epochs or patience did


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cpu``, ``cuda``, ``cuda:N`` as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
    elif resolved.type != "cpu":
        raise ValueError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return resolved


CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may keep busy: its CPU affinity, capped by a cgroup CPU quota (a
    container's CPU limit, which neither the affinity nor os.cpu_count() reflects: a pod
    limited to 2 CPUs on a 32-core node would otherwise start 32 threads and be
    throttled)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time the cgroup may use (cgroup v2 ``cpu.max``, else v1's CFS quota
    and period); None when unlimited or unreadable."""
    try:
        quota, period = (root / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


@contextmanager
def _deterministic(threads: int | None) -> Iterator[None]:
    """Deterministic kernels and a thread count for the duration; restored afterwards."""
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.get_num_threads(),
    )
    # cuBLAS needs this to be deterministic; it only takes effect if CUDA is not yet used.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic = previous[2]
        torch.backends.cudnn.benchmark = previous[3]
        torch.set_num_threads(previous[4])


def _scaled_tensors(
    windows: np.ndarray, targets: np.ndarray, device: torch.device, loss: str = "scaled"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model inputs, scaled targets and per-window loss weights (unnormalised).

    Scaled ``SCALE_CHUNK`` windows at a time into the float32 tensors that are kept.
    """
    if len(windows) != len(targets):
        raise ValueError(f"{len(windows)} windows but {len(targets)} targets")
    if len(windows) == 0:
        raise ValueError("no windows to train or validate on")
    if windows.ndim != 2:
        raise ValueError(f"expected [n, window] prices, got shape {windows.shape}")
    inputs = torch.empty((len(windows), windows.shape[1], 1), dtype=torch.float32)
    scaled_targets = torch.empty(len(windows), dtype=torch.float32)
    weights = torch.ones(len(windows), dtype=torch.float32)
    for start in range(0, len(windows), SCALE_CHUNK):
        rows = slice(start, start + SCALE_CHUNK)
        scaled = scale_windows(windows[rows])
        inputs[rows] = scaled.inputs
        scaled_targets[rows] = scale_targets(targets[rows], scaled)
        if loss == "relative":
            last = scaled.low + scaled.span * scaled.inputs[:, -1, 0].to(torch.float64)
            weights[rows] = (scaled.span / last) ** 2
    return inputs.to(device), scaled_targets.to(device), weights.to(device)


def _weighted_mse(
    outputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    return (weights * (outputs - targets) ** 2).mean()


def _mean_loss(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> float:
    model.eval()
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(inputs), EVAL_BATCH_SIZE):
            batch = slice(start, start + EVAL_BATCH_SIZE)
            outputs = model(inputs[batch])
            total += float((weights[batch] * (outputs - targets[batch]) ** 2).sum())
    return total / len(inputs)


def train_model(
    train_windows: np.ndarray,
    train_targets: np.ndarray,
    val_windows: np.ndarray,
    val_targets: np.ndarray,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fit a fresh :class:`PriceGRU` on [n, window] price windows and their next prices.

    Seeded and reproducible for a given config, data and device. Stops early after
    ``patience`` epochs without a lower validation loss and returns the best weights.
    """
    model_config = model_config or ModelConfig()
    config = train_config or TrainConfig()
    if train_windows.ndim != 2 or train_windows.shape[1] != model_config.window_length:
        raise ValueError(
            f"training windows have shape {train_windows.shape}; the model expects "
            f"[n, {model_config.window_length}]"
        )
    device = resolve_device(config.device)
    threads = config.num_threads or (
        min(torch.get_num_threads(), available_cpus()) if device.type == "cpu" else None
    )
    started = time.perf_counter()
    with _deterministic(threads):
        torch.manual_seed(config.seed)
        train_x, train_y, train_w = _scaled_tensors(
            train_windows, train_targets, device, config.loss
        )
        val_x, val_y, val_w = _scaled_tensors(val_windows, val_targets, device, config.loss)
        # One normaliser (the training mean) for both, so the two losses stay comparable.
        norm = train_w.mean()
        train_w, val_w = train_w / norm, val_w / norm
        model = PriceGRU(model_config).to(device)
        optimizer = torch.optim.Adam(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        shuffle = torch.Generator().manual_seed(config.seed)

        history = [
            EpochLoss(
                0,
                _mean_loss(model, train_x, train_y, train_w),
                _mean_loss(model, val_x, val_y, val_w),
            )
        ]
        best_epoch, best_val = 0, history[0].val_loss
        out_of_time = False
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bar = tqdm(
            range(1, config.epochs + 1),
            desc="training",
            unit="epoch",
            disable=not (progress and sys.stderr.isatty()),
            leave=False,
        )
        deadline = None if config.max_seconds is None else started + config.max_seconds
        for epoch in bar:
            model.train()
            order = torch.randperm(len(train_x), generator=shuffle).to(device)
            total, seen = 0.0, 0
            for start in range(0, len(order), config.batch_size):
                batch = order[start : start + config.batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = _weighted_mse(model(train_x[batch]), train_y[batch], train_w[batch])
                loss.backward()
                if config.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                total += float(loss.detach()) * len(batch)
                seen += len(batch)
                # The limit holds within an epoch too: a cut epoch's weights are scored
                # like any other and kept only if they are the best so far.
                if deadline is not None and time.perf_counter() >= deadline:
                    break
            cut_short = seen < len(order)
            val_loss = _mean_loss(model, val_x, val_y, val_w)
            history.append(EpochLoss(epoch, total / seen, val_loss))
            if val_loss < best_val:
                best_epoch, best_val = epoch, val_loss
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            bar.set_postfix(train=f"{total / seen:.3g}", val=f"{val_loss:.3g}", best=best_epoch)
            logger.debug("epoch %d: train %.6g, val %.6g", epoch, total / seen, val_loss)
            if epoch - best_epoch >= config.patience and not cut_short:
                logger.info("early stop after epoch %d (best %d)", epoch, best_epoch)
                break
            if deadline is not None and time.perf_counter() >= deadline:
                out_of_time = cut_short or epoch < config.epochs
                if out_of_time:
                    logger.warning(
                        "stopping %s epoch %d of %d (best %d): %.0f s spent, the "
                        "training time limit is %.0f s",
                        f"within ({seen} of {len(order)} windows)" if cut_short else "after",
                        epoch,
                        config.epochs,
                        best_epoch,
                        time.perf_counter() - started,
                        config.max_seconds,
                    )
                break
        bar.close()
        model.load_state_dict(best_state)
        model.eval()
    seconds = time.perf_counter() - started
    logger.info(
        "trained %d epoch(s) in %.1f s on %s; best epoch %d, val loss %.6g (untrained %.6g)",
        len(history) - 1,
        seconds,
        device,
        best_epoch,
        best_val,
        history[0].val_loss,
    )
    return TrainResult(model, history, best_epoch, best_val, str(device), seconds, out_of_time)
