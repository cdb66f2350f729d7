"""How the daemon serves the model: the checkpoint it loads at start, and how many
forward passes run at once on how many threads."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from daemon.predictor import Predictor, load_predictor, resolve_device
from daemon.settings import Settings
from model.checkpoint import CheckpointError, read_latest
from model.train import available_cpus

logger = logging.getLogger(__name__)


class NoCheckpointError(RuntimeError):
    """The daemon cannot start: there is no loadable checkpoint."""


def timed_predict(predictor: Predictor, windows: np.ndarray) -> tuple[np.ndarray, float]:
    """Runs in the inference thread: predictions and the forward pass's own duration."""
    started = time.perf_counter()
    predictions = predictor.predict(windows)
    return predictions, time.perf_counter() - started


def inference_workers(settings: Settings, device: torch.device, *, compiled: bool) -> int:
    """Batches scored at once: the setting, else one per core (at most 8) on CPU.

    Independent single-threaded forwards (each holds no GIL) share the cores with the
    event loop and the broker gracefully; one forward on several intra-op threads stalls
    at every fork/join barrier whenever one of its threads loses its core. CUDA (one
    stream, buffers per bucket) and the torch.compile-d step score one batch at a time.
    """
    if device.type == "cuda" or compiled:
        return 1
    if settings.inference_workers:
        return settings.inference_workers
    return min(8, available_cpus())


def inference_threads(settings: Settings, workers: int) -> int:
    """torch intra-op threads: the setting, else 1 beside several inference workers,
    else half the cores (1 to 8), leaving the rest to the event loop and the clients.
    """
    if settings.torch_threads:
        return settings.torch_threads
    if workers > 1:
        return 1
    return max(1, min(8, available_cpus() // 2))


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice value by ``nice`` (Linux: per thread), so that the
    event loop and the broker, which every tick passes through, never queue behind a
    forward pass; inference takes the CPU they leave. Elsewhere, or if refused, a no-op."""
    if nice <= 0 or sys.platform != "linux":
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:
        logger.warning("could not lower the inference threads' priority: %s", exc)


def load_serving_predictor(settings: Settings) -> Predictor:
    """The checkpoint named by LATEST, loaded and self-tested; NoCheckpointError if none."""
    root = Path(settings.checkpoint_dir)
    hint = f"train one with: tickcast retrain --data dataset:nasdaq --checkpoint-dir {root}"
    try:
        version = read_latest(root)
    except CheckpointError as exc:  # a LATEST that names no version (NUL bytes, a dir, ...)
        raise NoCheckpointError(f"{exc}; fix or remove it, or {hint}") from exc
    if version is None:
        raise NoCheckpointError(f"no checkpoint in {root} (no LATEST file); {hint}")
    device = resolve_device(settings.device)
    workers = inference_workers(settings, device, compiled=settings.inference == "compiled")
    torch.set_num_threads(inference_threads(settings, workers))
    try:
        predictor = load_predictor(
            root / version,
            device,
            fast=settings.inference != "reference",
            compile="step" if settings.inference == "compiled" else None,
        )
    except CheckpointError as exc:
        raise NoCheckpointError(f"checkpoint {version} in {root} is not loadable: {exc}") from exc
    if predictor.version != version:  # as the hot swap checks: LATEST names what serves
        raise NoCheckpointError(
            f"checkpoint {version} in {root} is not loadable: its meta.json names version "
            f"{predictor.version!r}"
        )
    return predictor
