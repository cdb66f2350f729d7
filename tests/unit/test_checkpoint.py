"""Checkpoints: exact round trip, refusal of code-running pickles, damage, atomic LATEST."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import stat
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

import model.checkpoint as checkpoint_module
from model.checkpoint import (
    LATEST_FILE,
    META_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    CheckpointMeta,
    DataRange,
    load_checkpoint,
    load_latest,
    new_version,
    promote,
    read_latest,
    save_checkpoint,
)
from model.data import load_series, make_windows
from model.gru import ModelConfig, PriceGRU, predict_prices

CONFIG = ModelConfig(hidden_size=8, window_length=20)


@pytest.fixture(scope="module")
def windows() -> np.ndarray:
    return make_windows(load_series("dataset:goog")[0].prices[:300], CONFIG.window_length)[0]


def make_model(seed: int = 0) -> PriceGRU:
    torch.manual_seed(seed)
    model = PriceGRU(CONFIG)
    with torch.no_grad():  # a non-zero head, as after training
        torch.nn.init.normal_(model.head.weight, std=0.1)
    return model.eval()


def save(root: Path, model: PriceGRU | None = None, **meta: Any) -> Path:
    version = meta.pop("version", None) or new_version()
    return save_checkpoint(
        root, model or make_model(), CheckpointMeta(version=version, architecture=CONFIG, **meta)
    )


def rewrite_meta(version_dir: Path, **changes: Any) -> None:
    meta = json.loads((version_dir / META_FILE).read_text())
    meta.update(changes)
    (version_dir / META_FILE).write_text(json.dumps(meta))


def test_round_trip_gives_identical_predictions(tmp_path: Path, windows: np.ndarray) -> None:
    model = make_model()
    data = [DataRange(source="dataset:goog", symbol="GOOG", start="a", end="b", rows=300)]
    path = save(tmp_path, model, training_data=data, evaluation={"rmse_ratio": 0.99})
    loaded = load_checkpoint(path)
    assert torch.equal(predict_prices(loaded.model, windows), predict_prices(model, windows))
    assert loaded.meta.architecture == CONFIG
    assert loaded.meta.training_data == data
    assert loaded.meta.evaluation == {"rmse_ratio": 0.99}
    assert loaded.version == path.name
    assert not loaded.model.training
    assert sorted(p.name for p in path.iterdir()) == [META_FILE, WEIGHTS_FILE]


class RunsCode:
    """Unpickling this calls open(path, "w"), i.e. creates a file: code execution."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    # The payload is live: plain unpickling does create its marker.
    proof = tmp_path / "proof-marker"
    pickle.loads(pickle.dumps(RunsCode(proof))).close()
    assert proof.exists()

    version_dir = save(tmp_path / "ck")
    marker = tmp_path / "marker"
    torch.save({"gru.weight_ih_l0": RunsCode(marker)}, version_dir / WEIGHTS_FILE)
    digest = hashlib.sha256((version_dir / WEIGHTS_FILE).read_bytes()).hexdigest()
    rewrite_meta(version_dir, weights_sha256=digest)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(version_dir)
    assert not marker.exists()


def test_truncated_weights_are_refused(tmp_path: Path) -> None:
    version_dir = save(tmp_path)
    weights = (version_dir / WEIGHTS_FILE).read_bytes()
    (version_dir / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="truncated or tampered"):
        load_checkpoint(version_dir)
    # Even with a hash that matches the truncated file, it does not parse.
    rewrite_meta(
        version_dir, weights_sha256=hashlib.sha256(weights[: len(weights) // 2]).hexdigest()
    )
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(version_dir)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"weights_sha256": "0" * 64}, "truncated or tampered"),
        ({"architecture": {**CONFIG.model_dump(), "hidden_size": 16}}, "does not fit"),
        ({"scaling": {"method": "global_minmax", "min_span_ratio": 1e-6}}, "scaling method"),
        ({"format_version": 99}, "format 99 is not supported"),
        ({"weights_file": "../elsewhere.safetensors"}, "plain file name"),
        ({"architecture": "gru"}, "does not describe a tickcast checkpoint"),
        ({"created_at": "yesterday"}, "created_at"),
        ({"created_at": "2026-01-01T00:00:00"}, "(?s)created_at.*timezone"),  # naive
        ({"created_at": None}, "created_at"),
    ],
)
def test_tampered_meta_is_refused(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    version_dir = save(tmp_path)
    rewrite_meta(version_dir, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(version_dir)


@pytest.mark.parametrize(
    "text",
    [
        '{"version": ',
        # Valid JSON that Python's parser still refuses: an integer over its 4,300-digit
        # limit (ValueError) and nesting deeper than its stack (RecursionError).
        '{"note": ' + "9" * 5000 + "}",
        '{"note": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ],
    ids=["truncated", "huge-integer", "deep-nesting"],
)
def test_meta_that_is_not_json_is_refused(tmp_path: Path, text: str) -> None:
    version_dir = save(tmp_path)
    (version_dir / META_FILE).write_text(text)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(version_dir)


@pytest.mark.parametrize(
    "changes",
    [{"residual": False}, {"window_length": 30}],
    ids=["residual", "window_length"],
)
def test_an_architecture_edit_that_keeps_the_shapes_is_refused(
    tmp_path: Path, changes: dict[str, Any]
) -> None:
    # Neither field changes a tensor's shape, and the weights' hash still matches: only
    # the architecture saved inside the weights file shows the edit.
    version_dir = save(tmp_path)
    rewrite_meta(version_dir, architecture={**CONFIG.model_dump(), **changes})
    with pytest.raises(CheckpointError, match="differs from the one saved with the weights"):
        load_checkpoint(version_dir)


def test_a_checkpoint_without_the_saved_architecture_still_loads(
    tmp_path: Path, windows: np.ndarray
) -> None:
    # Checkpoints written before the architecture went into the weights file.
    model = make_model()
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    weights = save_safetensors(state, metadata={"format": "pt", "version": "old"})
    version_dir = save(tmp_path, model, version="old")
    (version_dir / WEIGHTS_FILE).write_bytes(weights)
    rewrite_meta(version_dir, weights_sha256=hashlib.sha256(weights).hexdigest())
    loaded = load_checkpoint(version_dir)
    assert torch.equal(predict_prices(loaded.model, windows), predict_prices(model, windows))


def test_an_oversized_architecture_is_refused_before_it_is_allocated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # hidden_size 4096 × 8 layers is ~2.8 GiB of float32: built for real, a checkpoint
    # that is refused anyway could get a memory-limited daemon killed.
    built_on: list[str] = []

    class RecordingGRU(PriceGRU):
        def __init__(self, config: ModelConfig | None = None) -> None:
            super().__init__(config)
            built_on.append(next(self.parameters()).device.type)

    monkeypatch.setattr(checkpoint_module, "PriceGRU", RecordingGRU)
    version_dir = save(tmp_path)
    rewrite_meta(
        version_dir, architecture={**CONFIG.model_dump(), "hidden_size": 4096, "num_layers": 8}
    )
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(version_dir)
    assert built_on == ["meta"]


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    model = make_model()
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    with pytest.raises(CheckpointError, match="NaN or infinity"):
        load_checkpoint(save(tmp_path, model))


def test_an_existing_version_is_not_overwritten(tmp_path: Path) -> None:
    path = save(tmp_path, version="v1")
    with pytest.raises(CheckpointError, match="already exists"):
        save(tmp_path, version="v1")
    assert load_checkpoint(path).version == "v1"


def test_promote_and_load_latest(tmp_path: Path, windows: np.ndarray) -> None:
    assert read_latest(tmp_path) is None
    with pytest.raises(CheckpointError, match="no checkpoint in service"):
        load_latest(tmp_path)
    first = save(tmp_path, make_model(1), version="v1")
    second = save(tmp_path, make_model(2), version="v2")
    promote(tmp_path, first.name)
    assert read_latest(tmp_path) == "v1"
    promote(tmp_path, second.name)
    latest = load_latest(tmp_path)
    assert latest.version == "v2"
    assert torch.equal(
        predict_prices(latest.model, windows), predict_prices(make_model(2), windows)
    )
    # Only the pointer and the two versions: no temp files left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_FILE, "v1", "v2"]
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        promote(tmp_path, "v3")
    assert read_latest(tmp_path) == "v2"


def test_promote_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(tmp_path, version="v1")
    save(tmp_path, version="v2")
    promote(tmp_path, "v1")

    def crash(src: str, dst: str) -> None:
        raise OSError("disk gone at the worst moment")

    # A crash before the rename leaves the old pointer whole and no temp file behind.
    monkeypatch.setattr(checkpoint_module.os, "replace", crash)
    with pytest.raises(OSError, match="worst moment"):
        promote(tmp_path, "v2")
    monkeypatch.undo()
    assert (tmp_path / LATEST_FILE).read_text() == "v1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_FILE, "v1", "v2"]


@pytest.mark.parametrize("pointer", ["../outside", ".hidden", "missing"])
def test_bad_latest_pointer_is_refused(tmp_path: Path, pointer: str) -> None:
    save(tmp_path, version="v1")
    (tmp_path / LATEST_FILE).write_text(pointer + "\n")
    with pytest.raises(CheckpointError):
        load_latest(tmp_path)


def test_latest_naming_a_mislabelled_version_is_refused(tmp_path: Path) -> None:
    version_dir = save(tmp_path, version="v1")
    version_dir.rename(tmp_path / "v2")
    (tmp_path / LATEST_FILE).write_text("v2\n")
    with pytest.raises(CheckpointError, match="says version 'v1'"):
        load_latest(tmp_path)


# --------------------------------------------------------------------------- created_at


def test_created_at_is_written_as_before_and_read_as_an_aware_datetime(tmp_path: Path) -> None:
    before = time.time()
    version_dir = save(tmp_path)
    written = json.loads((version_dir / META_FILE).read_text())["created_at"]
    # The format existing checkpoints have: datetime.isoformat() of a UTC time.
    assert written.endswith("+00:00") and "T" in written
    meta = load_checkpoint(version_dir).meta
    assert meta.created_at == datetime.fromisoformat(written)
    assert meta.created_at.tzinfo is not None
    assert before - 1 <= meta.created_at_epoch() <= time.time() + 1


@pytest.mark.parametrize(
    ("created_at", "epoch"),
    [
        ("2026-01-02T03:04:05.678901+00:00", 1767323045.678901),  # what the writer writes
        ("2026-01-02T03:04:05Z", 1767323045.0),
        ("2026-01-02T05:04:05+02:00", 1767323045.0),
    ],
)
def test_existing_iso_created_at_values_load(tmp_path: Path, created_at: str, epoch: float) -> None:
    version_dir = save(tmp_path)
    rewrite_meta(version_dir, created_at=created_at)
    assert load_checkpoint(version_dir).meta.created_at_epoch() == pytest.approx(epoch)


# --------------------------------------------------------------------------- LATEST


def _latest_with(content: bytes) -> Callable[[Path], object]:
    return lambda root: (root / LATEST_FILE).write_bytes(content)


def _latest_is_a_directory(root: Path) -> None:
    (root / LATEST_FILE).mkdir()


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (_latest_with(b"\0" * 4096), "NUL bytes"),  # zero-filled after a crash
        (_latest_with(b"v1\0\n"), "NUL bytes"),
        (_latest_is_a_directory, "Is a directory"),
        (_latest_with(b"../x\n"), "invalid version '../x': it contains a path separator"),
        (_latest_with(b"v1/../../x\n"), "path separator"),
        (_latest_with(b"..\n"), "invalid version '..'"),
        (_latest_with(b".hidden\n"), "invalid version '.hidden'"),
        (_latest_with(b""), "is empty"),
        (_latest_with(b" \n\t\n"), "is empty"),
        (_latest_with(b"\xff\xfe garbage"), "not UTF-8"),
        (_latest_with(b"v1\nv2\n"), "control characters"),
        (_latest_with(b"v" * 300), "longer than 255 bytes"),
        (_latest_with(b"v" * 5000), "longer than 1024 bytes"),
    ],
)
def test_an_unusable_latest_is_a_checkpoint_error_naming_the_file(
    tmp_path: Path, write: Callable[[Path], object], message: str
) -> None:
    save(tmp_path, version="v1")
    write(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(message)) as info:
        read_latest(tmp_path)
    assert str(tmp_path / LATEST_FILE) in str(info.value)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_latest(tmp_path)


def test_a_checkpoint_dir_that_is_a_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "checkpoints"
    not_a_dir.write_text("oops")
    with pytest.raises(CheckpointError, match="Not a directory"):
        read_latest(not_a_dir)


def test_no_latest_yet_is_none(tmp_path: Path) -> None:
    assert read_latest(tmp_path / "does-not-exist-yet") is None
    assert read_latest(tmp_path) is None


@pytest.mark.parametrize("version", ["../x", "a/b", ".hidden", "", "v1\n"])
def test_invalid_version_names_are_neither_saved_nor_promoted(tmp_path: Path, version: str) -> None:
    root = tmp_path / "ck"
    with pytest.raises(CheckpointError, match="invalid version"):
        save_checkpoint(root, make_model(), CheckpointMeta(version=version, architecture=CONFIG))
    with pytest.raises(CheckpointError, match="invalid version"):
        promote(root, version)
    assert not (tmp_path / "x").exists()
    assert read_latest(root) is None


# --------------------------------------------------------------------------- durability


def test_saved_checkpoints_are_readable_by_other_users(tmp_path: Path) -> None:
    old_umask = os.umask(0o077)  # the strictest usual umask must not matter
    try:
        version_dir = save(tmp_path, version="v1")
        promote(tmp_path, "v1")
    finally:
        os.umask(old_umask)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(version_dir) == 0o755
    assert mode(version_dir / WEIGHTS_FILE) == 0o644
    assert mode(version_dir / META_FILE) == 0o644
    assert mode(tmp_path / LATEST_FILE) == 0o644


def test_files_and_directories_are_fsynced_around_each_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    real_fsync = os.fsync
    # For each fsync: the inode synced, and whether v1 / the new LATEST were in place then.
    calls: list[tuple[int, bool, bool]] = []

    def recording_fsync(fd: int) -> None:
        latest = root / LATEST_FILE
        promoted = latest.is_file() and latest.read_text() == "v1\n"
        calls.append((os.fstat(fd).st_ino, (root / "v1").exists(), promoted))
        real_fsync(fd)

    monkeypatch.setattr(checkpoint_module.os, "fsync", recording_fsync)
    version_dir = save(root, version="v1")
    promote(root, "v1")
    monkeypatch.undo()

    def ino(path: Path) -> int:
        return path.stat().st_ino

    # Each file and the version directory before the rename into place; the checkpoint
    # dir after it. Then LATEST's content before its rename, the checkpoint dir after.
    assert calls == [
        (ino(version_dir / WEIGHTS_FILE), False, False),
        (ino(version_dir / META_FILE), False, False),
        (ino(version_dir), False, False),
        (ino(root), True, False),
        (ino(root / LATEST_FILE), True, False),
        (ino(root), True, True),
    ]
