"""Hot swap: watch CHECKPOINT_DIR/LATEST and hand new, validated models to the service.

Polling (every TICKCAST_CHECKPOINT_POLL_S, or at once on SIGHUP) works on every file
system, shared volumes included, where inotify does not. Loading and validation run in a
thread, off the event loop; the swap itself happens between two batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

from daemon.metrics import DaemonMetrics
from daemon.predictor import Predictor, load_predictor
from model.checkpoint import LATEST_FILE, META_FILE, WEIGHTS_FILE, CheckpointError, read_latest

logger = logging.getLogger(__name__)

T = TypeVar("T")

# (version, its files' (mtime_ns, size)): what was rejected, so that a bad version is not
# reloaded (and re-logged) every poll, yet is retried once its files change.
_Signature = tuple[str, tuple[tuple[int, int] | None, ...]]
# (the error, LATEST's (mtime_ns, size)): an unusable LATEST, counted and logged once until
# it is rewritten.
_LatestSignature = tuple[str, tuple[int, int] | None]


class _Swappable(Protocol):
    predictor: Predictor
    metrics: DaemonMetrics

    def request_swap(self, predictor: Predictor) -> None: ...


async def in_daemon_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a daemon thread. Unlike ``asyncio.to_thread``, a call stuck
    on a hung volume does not hold up the exit: ``asyncio.run`` waits without a bound for
    its executor's threads, and the interpreter joins every executor's threads at exit."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not done.done():  # the awaiting task may have been cancelled meanwhile
            outcome()

    def run() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            outcome = partial(done.set_exception, exc)
        else:
            outcome = partial(done.set_result, result)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=run, name="tickcast-load-checkpoint", daemon=True).start()
    return await done


def _stat_signature(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return None
    return (st.st_mtime_ns, st.st_size)


def _signature(version_dir: Path) -> tuple[tuple[int, int] | None, ...]:
    return tuple(_stat_signature(version_dir / name) for name in (META_FILE, WEIGHTS_FILE))


class ModelWatcher:
    """Loads the version LATEST names when it changes; rejects what fails validation."""

    def __init__(self, service: _Swappable, checkpoint_dir: Path, poll_s: float) -> None:
        self._service = service
        self._dir = Path(checkpoint_dir)
        self._poll_s = poll_s
        self._wake = asyncio.Event()
        self._rejected: _Signature | None = None
        self._bad_latest: _LatestSignature | None = None  # an unusable LATEST, counted once
        # The version handed to the service: an idle daemon swaps only at its next batch,
        # and must not reload (and recount) the same version every poll until then.
        self._requested: str | None = None
        self._signals = 0  # SIGHUPs so far

    def check_now(self) -> None:
        """SIGHUP: look at LATEST without waiting for the next poll, and try again what was
        rejected: a polled rejection is remembered until the files change, but the cause
        may have been outside them (permissions, memory, a read error)."""
        self._rejected = None
        self._bad_latest = None
        self._signals += 1  # a check already loading must not remember its rejection
        self._wake.set()

    async def run(self) -> None:
        """Check every ``poll_s`` seconds, or at once after :meth:`check_now`, until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_s)
            self._wake.clear()
            await self.check()

    async def check(self) -> bool:
        """Load and hand over a new LATEST; True when a swap was requested.

        Never raises for a bad checkpoint: whatever LATEST names, the model in service
        keeps serving unless the new one loads and passes validation.
        """
        current = self._service.predictor
        signals = self._signals
        try:
            version = read_latest(self._dir)
        except Exception as exc:  # an unusable LATEST (NUL bytes, a directory, '../x', ...)
            self._reject_latest(exc, current)
            return False
        self._bad_latest = None
        if version is None:
            return False
        if version == current.version:
            if self._requested not in (None, version):
                # LATEST rolled back before the requested swap took effect: cancel it.
                self._service.request_swap(current)
            self._requested = None
            return False
        if version == self._requested:
            return False  # handed over; the service swaps it in at its next batch
        version_dir = self._dir / version
        signature = (version, _signature(version_dir))
        if signature == self._rejected:
            return False
        try:
            if Path(version).name != version or version.startswith("."):
                raise CheckpointError(f"LATEST names an invalid version {version!r}")
            candidate = await in_daemon_thread(
                load_predictor,
                version_dir,
                current.device,
                fast=current.fast is not None,
                compile=current.compile,
            )
            if candidate.window_length != current.window_length:
                raise CheckpointError(
                    f"window length {candidate.window_length} differs from the running "
                    f"windows' {current.window_length}; restart the daemon to change it"
                )
            if candidate.version != version:
                raise CheckpointError(f"meta.json names version {candidate.version!r}")
        except Exception as exc:  # any failure rejects the checkpoint, never the daemon
            # Remembered (not retried by polls) unless a SIGHUP came while it loaded.
            self._rejected = signature if signals == self._signals else None
            self._service.metrics.model_reloads.labels("rejected").inc()
            logger.error(
                "checkpoint %s rejected, still serving %s: %s: %s",
                version,
                current.version,
                type(exc).__name__,
                exc,
            )
            return False
        self._rejected = None
        self._requested = version
        self._service.request_swap(candidate)
        self._service.metrics.model_reloads.labels("success").inc()
        logger.info(
            "checkpoint %s loaded; replacing %s at the next batch", version, current.version
        )
        return True

    def _reject_latest(self, exc: Exception, current: Predictor) -> None:
        """Count and log an unusable LATEST once (until it changes); keep serving."""
        signature = (f"{type(exc).__name__}: {exc}", _stat_signature(self._dir / LATEST_FILE))
        if signature == self._bad_latest:
            return
        self._bad_latest = signature
        self._service.metrics.model_reloads.labels("rejected").inc()
        logger.error(
            "%s rejected, still serving %s: %s", LATEST_FILE, current.version, signature[0]
        )
