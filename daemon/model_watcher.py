"""Hot swap: watch CHECKPOINT_DIR/LATEST and hand new, validated models to the service.

Polling (every TICKCAST_CHECKPOINT_POLL_S, or at once on SIGHUP) works on every file
system, shared volumes included, where inotify does not. Loading and validation run in a
thread, off the event loop; the swap itself happens between two batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Protocol

from daemon.metrics import DaemonMetrics
from daemon.predictor import Predictor, load_predictor
from model.checkpoint import CheckpointError, read_latest

logger = logging.getLogger(__name__)


class _Swappable(Protocol):
    predictor: Predictor
    metrics: DaemonMetrics

    def request_swap(self, predictor: Predictor) -> None: ...


class ModelWatcher:
    """Loads the version LATEST names when it changes; rejects what fails validation."""

    def __init__(self, service: _Swappable, checkpoint_dir: Path, poll_s: float) -> None:
        self._service = service
        self._dir = Path(checkpoint_dir)
        self._poll_s = poll_s
        self._wake = asyncio.Event()
        self._rejected: str | None = None  # don't retry (and re-log) the same bad version

    def check_now(self) -> None:
        """SIGHUP: look at LATEST without waiting for the next poll."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_s)
            self._wake.clear()
            await self.check()

    async def check(self) -> bool:
        """Load and hand over a new LATEST; True when a swap was requested."""
        try:
            version = read_latest(self._dir)
        except OSError as exc:
            logger.warning("cannot read %s/LATEST: %s", self._dir, exc)
            return False
        current = self._service.predictor
        if version is None or version == current.version or version == self._rejected:
            return False
        try:
            candidate = await asyncio.to_thread(load_predictor, self._dir / version, current.device)
            if candidate.window_length != current.window_length:
                raise CheckpointError(
                    f"window length {candidate.window_length} differs from the running "
                    f"windows' {current.window_length}; restart the daemon to change it"
                )
            if candidate.version != version:
                raise CheckpointError(f"meta.json names version {candidate.version!r}")
        except (CheckpointError, OSError, RuntimeError, ValueError) as exc:
            self._rejected = version
            self._service.metrics.model_reloads.labels("rejected").inc()
            logger.error(
                "checkpoint %s rejected, still serving %s: %s", version, current.version, exc
            )
            return False
        self._rejected = None
        self._service.request_swap(candidate)
        self._service.metrics.model_reloads.labels("success").inc()
        logger.info(
            "checkpoint %s loaded; replacing %s at the next batch", version, current.version
        )
        return True
