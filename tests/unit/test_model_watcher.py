"""ModelWatcher without Kafka: immediate checks, swaps, and every kind of bad checkpoint.

``BAD_CHECKPOINTS`` writes each rejected case into a checkpoint directory and points
LATEST at it (or breaks LATEST itself); the hot-swap tests on the real broker reuse them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from daemon.metrics import DaemonMetrics
from daemon.model_watcher import ModelWatcher, _signature
from daemon.predictor import Predictor, load_predictor
from model.checkpoint import (
    LATEST_FILE,
    META_FILE,
    WEIGHTS_FILE,
    CheckpointMeta,
    new_version,
    promote,
    read_latest,
    save_checkpoint,
)
from model.gru import ModelConfig, PriceGRU
from tests.support.daemon import make_checkpoint

WATCHER_LOGGER = "daemon.model_watcher"


# --------------------------------------------------------------------------- bad checkpoints


class _MkdirOnUnpickle:
    """A pickle payload that runs code: unpickling it creates ``path`` (a directory)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return (os.mkdir, (str(self.path),))


def code_running_pickle(marker: Path) -> bytes:
    """``torch.save`` bytes whose unpickling (``weights_only=False``) creates ``marker``."""
    buffer = io.BytesIO()
    torch.save({"gru.weight_ih_l0": _MkdirOnUnpickle(marker)}, buffer)
    return buffer.getvalue()


def clone_with_weights(root: Path, weights: bytes, *, fix_sha: bool) -> str:
    """A copy of the version in service with other weight bytes, promoted to LATEST.

    ``fix_sha`` records the new bytes' SHA-256 in meta.json, so that the hash check
    passes and the later checks (format, shapes, finiteness) are the ones that refuse it.
    """
    source = root / str(read_latest(root))
    meta = json.loads((source / META_FILE).read_text())
    version = new_version()
    meta["version"] = version
    if fix_sha:
        meta["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    target = root / version
    target.mkdir()
    (target / WEIGHTS_FILE).write_bytes(weights)
    (target / META_FILE).write_text(json.dumps(meta))
    promote(root, version)
    return version


def _weights_in_service(root: Path) -> bytes:
    return (root / str(read_latest(root)) / WEIGHTS_FILE).read_bytes()


def corrupt_weights(root: Path, tmp: Path) -> str:
    weights = bytearray(_weights_in_service(root))
    middle = len(weights) // 2
    weights[middle : middle + 16] = bytes(b ^ 0xFF for b in weights[middle : middle + 16])
    return clone_with_weights(root, bytes(weights), fix_sha=False)


def truncated_weights(root: Path, tmp: Path) -> str:
    weights = _weights_in_service(root)
    return clone_with_weights(root, weights[: len(weights) // 2], fix_sha=True)


def wrong_window_length(root: Path, tmp: Path) -> str:
    return make_checkpoint(root, seed=3, window_length=30)


def nan_weights(root: Path, tmp: Path) -> str:
    model = PriceGRU(ModelConfig())
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    version = new_version()
    save_checkpoint(root, model, CheckpointMeta(version=version, architecture=model.config))
    promote(root, version)
    return version


def pickle_that_runs_code(root: Path, tmp: Path) -> str:
    return clone_with_weights(root, code_running_pickle(tmp / "pwned"), fix_sha=True)


def missing_version(root: Path, tmp: Path) -> str:
    version = new_version()
    (root / LATEST_FILE).write_text(version + "\n")  # no such directory
    return version


def path_outside_the_checkpoint_dir(root: Path, tmp: Path) -> str:
    version = "../elsewhere"
    (root / LATEST_FILE).write_text(version + "\n")
    return version


def created_at_not_iso(root: Path, tmp: Path) -> str:
    """A meta.json whose created_at is no timestamp: refused at load, not when served."""
    source = root / str(read_latest(root))
    meta = json.loads((source / META_FILE).read_text())
    version = new_version()
    meta["version"] = version
    meta["created_at"] = "yesterday"
    target = root / version
    target.mkdir()
    (target / WEIGHTS_FILE).write_bytes((source / WEIGHTS_FILE).read_bytes())
    (target / META_FILE).write_text(json.dumps(meta))
    promote(root, version)
    return version


# A LATEST that names no version at all; the log line names the file.


def nul_bytes_in_latest(root: Path, tmp: Path) -> str:
    (root / LATEST_FILE).write_bytes(b"\0" * 4096)  # zero-filled after a crash
    return LATEST_FILE


def latest_is_a_directory(root: Path, tmp: Path) -> str:
    (root / LATEST_FILE).unlink()
    (root / LATEST_FILE).mkdir()
    return LATEST_FILE


def empty_latest(root: Path, tmp: Path) -> str:
    (root / LATEST_FILE).write_bytes(b"")
    return LATEST_FILE


@dataclass(frozen=True)
class BadCheckpoint:
    write: Callable[[Path, Path], str]  # (checkpoint dir, scratch dir) -> text the log names
    reason: str  # what the one log line must say


BAD_CHECKPOINTS = {
    "corrupt_weights": BadCheckpoint(corrupt_weights, "does not match meta.json"),
    "truncated_weights": BadCheckpoint(truncated_weights, "is not a safetensors file"),
    "wrong_window_length": BadCheckpoint(wrong_window_length, "window length 30 differs"),
    "nan_weights": BadCheckpoint(nan_weights, "holds NaN or infinity"),
    "pickle_that_runs_code": BadCheckpoint(pickle_that_runs_code, "is not a safetensors file"),
    "missing_version": BadCheckpoint(missing_version, "does not exist"),
    "path_outside_the_checkpoint_dir": BadCheckpoint(
        path_outside_the_checkpoint_dir, "invalid version"
    ),
    "created_at_not_iso": BadCheckpoint(created_at_not_iso, "created_at"),
    "nul_bytes_in_latest": BadCheckpoint(nul_bytes_in_latest, "holds NUL bytes"),
    "latest_is_a_directory": BadCheckpoint(latest_is_a_directory, "Is a directory"),
    "empty_latest": BadCheckpoint(empty_latest, "is empty"),
}


# --------------------------------------------------------------------------- a fake service


class FakeService:
    """What the watcher needs of TickcastService: the predictor, metrics, request_swap."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.metrics = DaemonMetrics(CollectorRegistry(), process=False)
        self.requested: list[Predictor] = []
        self.swap_requested = asyncio.Event()

    def request_swap(self, predictor: Predictor) -> None:
        self.requested.append(predictor)
        self.swap_requested.set()

    def apply_swap(self) -> None:
        """What the service does at its next batch."""
        self.predictor = self.requested[-1]

    def reloads(self, result: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "tickcast_model_reloads_total", {"result": result}
        )
        return value or 0.0


@pytest.fixture
def root(tmp_path: Path) -> Path:
    directory = tmp_path / "checkpoints"
    make_checkpoint(directory, seed=7)
    return directory


@pytest.fixture
def service(root: Path) -> FakeService:
    return FakeService(load_predictor(root / str(read_latest(root)), torch.device("cpu")))


def watcher_for(service: FakeService, root: Path, poll_s: float = 3600.0) -> ModelWatcher:
    return ModelWatcher(service, root, poll_s)


def rejections(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == WATCHER_LOGGER and r.levelno >= logging.WARNING]


@contextlib.asynccontextmanager
async def polling(watcher: ModelWatcher) -> AsyncIterator[asyncio.Task[None]]:
    """The watcher's polling task, running for the block and cancelled after it."""
    task = asyncio.create_task(watcher.run())
    try:
        yield task
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --------------------------------------------------------------------------- tests


async def test_check_now_triggers_an_immediate_check(root: Path, service: FakeService) -> None:
    watcher = watcher_for(service, root, poll_s=3600.0)  # the poll alone would never fire
    async with polling(watcher):
        new = make_checkpoint(root, seed=11)
        await asyncio.sleep(0.3)
        assert service.requested == []  # nobody asked: the next poll is an hour away
        watcher.check_now()
        await asyncio.wait_for(service.swap_requested.wait(), 30)
        assert service.requested[0].version == new
        assert service.reloads("success") == 1


async def test_polling_finds_a_new_version(root: Path, service: FakeService) -> None:
    watcher = watcher_for(service, root, poll_s=0.05)
    async with polling(watcher):
        new = make_checkpoint(root, seed=11)
        await asyncio.wait_for(service.swap_requested.wait(), 30)
        assert [p.version for p in service.requested] == [new]


async def test_a_version_handed_over_is_not_reloaded_before_the_service_swaps_it(
    root: Path, service: FakeService
) -> None:
    # An idle daemon swaps only at its next batch; polls until then must not reload.
    watcher = watcher_for(service, root)
    new = make_checkpoint(root, seed=11)
    assert await watcher.check()
    assert not await watcher.check()
    assert not await watcher.check()
    assert service.reloads("success") == 1
    service.apply_swap()
    assert service.predictor.version == new
    assert not await watcher.check()


async def test_rollback_before_the_swap_cancels_it(root: Path, service: FakeService) -> None:
    old = service.predictor.version
    watcher = watcher_for(service, root)
    make_checkpoint(root, seed=11)
    assert await watcher.check()
    promote(root, old)
    assert not await watcher.check()
    service.apply_swap()
    assert service.predictor.version == old


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
async def test_a_bad_checkpoint_is_rejected_once_with_one_log_line(
    case: str,
    root: Path,
    service: FakeService,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = BAD_CHECKPOINTS[case]
    serving = service.predictor.version
    watcher = watcher_for(service, root)
    caplog.set_level(logging.INFO, logger=WATCHER_LOGGER)
    version = bad.write(root, tmp_path)

    for _ in range(3):  # polls after the first do not reload, recount or re-log it
        assert not await watcher.check()

    assert service.requested == []
    assert service.predictor.version == serving
    assert service.reloads("rejected") == 1
    assert service.reloads("success") == 0
    [line] = rejections(caplog)
    assert line.levelno == logging.ERROR
    message = line.getMessage()
    assert version in message and serving in message and bad.reason in message
    assert not (tmp_path / "pwned").exists()


async def test_sighup_retries_a_checkpoint_rejected_for_a_cause_outside_its_files(
    root: Path, service: FakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first load fails (as on a permission or read error); polls do not retry the
    same files, but an operator's SIGHUP, once the cause is fixed, does."""
    from daemon import model_watcher

    loads = 0

    def load_once_failing(*args: object, **kwargs: object) -> Predictor:
        nonlocal loads
        loads += 1
        if loads == 1:
            raise PermissionError("model.safetensors: permission denied")
        return load_predictor(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(model_watcher, "load_predictor", load_once_failing)
    watcher = watcher_for(service, root)
    new = make_checkpoint(root, seed=11)
    assert not await watcher.check()
    assert not await watcher.check()  # a poll: the same files, not retried
    assert loads == 1 and service.reloads("rejected") == 1
    async with polling(watcher):
        watcher.check_now()
        await asyncio.wait_for(service.swap_requested.wait(), 30)
    assert [p.version for p in service.requested] == [new]
    assert loads == 2 and service.reloads("success") == 1


async def test_a_sighup_during_a_failing_load_is_not_swallowed(
    root: Path, service: FakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator fixes the cause and sends SIGHUP while the failing load still runs:
    the check it wakes must try again, not find the rejection just remembered."""
    from daemon import model_watcher

    loads = 0
    watcher = watcher_for(service, root)

    def load_failing_while_signalled(*args: object, **kwargs: object) -> Predictor:
        nonlocal loads
        loads += 1
        if loads == 1:
            watcher.check_now()  # SIGHUP arrives mid-load
            raise PermissionError("model.safetensors: permission denied")
        return load_predictor(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(model_watcher, "load_predictor", load_failing_while_signalled)
    new = make_checkpoint(root, seed=11)
    assert not await watcher.check()
    assert await watcher.check()  # the check SIGHUP woke
    assert loads == 2 and [p.version for p in service.requested] == [new]


def test_the_pickle_payload_would_run_code(tmp_path: Path) -> None:
    """The pickle case is live: an unsafe loader does execute it (so the refusal matters)."""
    marker = tmp_path / "ran"
    torch.load(io.BytesIO(code_running_pickle(marker)), weights_only=False)
    assert marker.exists()


async def test_a_rejected_version_is_retried_once_its_files_change(
    root: Path, service: FakeService, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A publisher that points LATEST first and writes the directory second recovers.
    watcher = watcher_for(service, root)
    good = root.parent / "staging"
    version = make_checkpoint(good, seed=11)
    (root / LATEST_FILE).write_text(version + "\n")
    assert not await watcher.check()
    assert service.reloads("rejected") == 1
    (good / version).rename(root / version)
    assert await watcher.check()
    assert service.requested[0].version == version


async def test_an_unusable_latest_is_rejected_once_and_keeps_serving(
    root: Path, service: FakeService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=WATCHER_LOGGER)
    watcher = watcher_for(service, root)
    (root / LATEST_FILE).write_bytes(b"\xff\xfe garbage")
    for _ in range(3):
        assert not await watcher.check()
    [line] = rejections(caplog)
    assert "not UTF-8" in line.getMessage() and str(root / LATEST_FILE) in line.getMessage()
    assert service.reloads("rejected") == 1
    # It recovers as soon as LATEST is sane again ...
    new = make_checkpoint(root, seed=11)
    assert await watcher.check()
    assert service.requested[0].version == new
    service.apply_swap()
    # ... and a later broken LATEST is counted again.
    (root / LATEST_FILE).write_bytes(b"\0" * 16)
    assert not await watcher.check()
    assert not await watcher.check()
    assert service.reloads("rejected") == 2
    assert service.predictor.version == new


async def test_a_zero_filled_latest_does_not_stop_the_polling_task(
    root: Path, service: FakeService
) -> None:
    watcher = watcher_for(service, root, poll_s=0.02)
    async with polling(watcher) as task:
        (root / LATEST_FILE).write_bytes(b"\0" * 4096)
        await asyncio.sleep(0.3)  # many polls
        assert not task.done()
        assert service.reloads("rejected") == 1
        new = make_checkpoint(root, seed=11)  # a retrain that promotes a good one
        await asyncio.wait_for(service.swap_requested.wait(), 30)
        assert [p.version for p in service.requested] == [new]


def test_the_rejection_signature_of_a_nul_path_does_not_raise(tmp_path: Path) -> None:
    assert _signature(tmp_path / "v1\0") == (None, None)
