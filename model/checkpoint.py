"""Checkpoints: ``<dir>/<version>/`` with safetensors weights and ``meta.json``.

safetensors holds raw tensors only, so loading one can never execute code (unlike a
pickle). ``meta.json`` records the architecture, window length, scaling, training data,
evaluation figures and lineage, plus a SHA-256 of the weights so that a truncated or
tampered file is refused. ``<dir>/LATEST`` names the version in service and is replaced
atomically: write a temp file, then ``os.replace``, so a reader never sees half of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from model.features import MIN_SPAN_RATIO, SCALING_METHOD
from model.gru import ModelConfig, PriceGRU

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
LATEST_FILE = "LATEST"


class CheckpointError(Exception):
    """A checkpoint is missing, incompatible, truncated or tampered with."""


class ScalingInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str = SCALING_METHOD
    min_span_ratio: float = MIN_SPAN_RATIO


class DataRange(BaseModel):
    """One training series: where it came from and what span of it was used."""

    model_config = ConfigDict(frozen=True)

    source: str
    symbol: str
    start: str
    end: str
    rows: int


class CheckpointMeta(BaseModel):
    """Everything ``meta.json`` records about one checkpoint."""

    model_config = ConfigDict(frozen=True, extra="allow", protected_namespaces=())

    format_version: int = FORMAT_VERSION
    version: str
    architecture: ModelConfig
    scaling: ScalingInfo = Field(default_factory=ScalingInfo)
    training_data: list[DataRange] = Field(default_factory=list)
    evaluation: dict[str, Any] = Field(default_factory=dict)
    parent_version: str | None = None
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    weights_file: str = WEIGHTS_FILE
    weights_sha256: str = ""

    @property
    def window_length(self) -> int:
        return self.architecture.window_length

    def created_at_epoch(self) -> float:
        return datetime.fromisoformat(self.created_at).timestamp()


@dataclass(frozen=True)
class Checkpoint:
    """A loaded, validated checkpoint: the model in eval mode and its meta."""

    model: PriceGRU
    meta: CheckpointMeta
    path: Path

    @property
    def version(self) -> str:
        return self.meta.version


def new_version(now: datetime | None = None) -> str:
    """A sortable, unique version name such as ``20261201T010203Z-3f9a1c``."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(checkpoint_dir: Path | str, model: PriceGRU, meta: CheckpointMeta) -> Path:
    """Write ``<checkpoint_dir>/<meta.version>/`` and return its path (does not promote).

    The version directory is assembled under a temporary name and renamed into place, so
    a watcher never sees a version without both of its files.
    """
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / meta.version
    if final.exists():
        raise CheckpointError(f"checkpoint version {meta.version!r} already exists in {root}")
    state = {
        name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()
    }
    weights = save_safetensors(state, metadata={"format": "pt", "version": meta.version})
    meta = meta.model_copy(
        update={
            "architecture": model.config,
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
        }
    )
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{meta.version}."))
    try:
        (staging / WEIGHTS_FILE).write_bytes(weights)
        (staging / META_FILE).write_text(meta.model_dump_json(indent=2) + "\n")
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def read_meta(version_dir: Path) -> CheckpointMeta:
    meta_path = version_dir / META_FILE
    try:
        raw = json.loads(meta_path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{meta_path} is missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path} is not valid JSON: {exc}") from exc
    try:
        meta = CheckpointMeta.model_validate(raw)
    except ValidationError as exc:
        raise CheckpointError(
            f"{meta_path} does not describe a tickcast checkpoint: {exc}"
        ) from exc
    if meta.format_version != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: checkpoint format {meta.format_version} is not supported "
            f"(this tickcast reads format {FORMAT_VERSION})"
        )
    if meta.scaling.method != SCALING_METHOD:
        raise CheckpointError(f"{meta_path}: unknown scaling method {meta.scaling.method!r}")
    if meta.scaling.min_span_ratio != MIN_SPAN_RATIO:
        raise CheckpointError(
            f"{meta_path}: scaling min_span_ratio {meta.scaling.min_span_ratio} differs from "
            f"the features module's {MIN_SPAN_RATIO}"
        )
    return meta


def load_checkpoint(version_dir: Path | str, device: torch.device | str = "cpu") -> Checkpoint:
    """Load and validate one version directory; raise :class:`CheckpointError` if unusable.

    Checks the meta, the weights' hash, the tensor names and shapes against the recorded
    architecture, and that every weight is finite.
    """
    version_dir = Path(version_dir)
    if not version_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {version_dir} does not exist")
    meta = read_meta(version_dir)
    if Path(meta.weights_file).name != meta.weights_file:
        raise CheckpointError(f"{version_dir}: weights_file must be a plain file name")
    weights_path = version_dir / meta.weights_file
    try:
        weights = weights_path.read_bytes()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{weights_path} is missing") from exc
    digest = hashlib.sha256(weights).hexdigest()
    if digest != meta.weights_sha256:
        raise CheckpointError(
            f"{weights_path}: SHA-256 {digest[:12]}… does not match meta.json "
            f"({meta.weights_sha256[:12]}…): truncated or tampered"
        )
    try:
        state = load_safetensors(weights)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{weights_path} is not a safetensors file: {exc}") from exc
    model = PriceGRU(meta.architecture)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        wrong = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
        raise CheckpointError(
            f"{weights_path} does not fit architecture {meta.architecture.model_dump()}: "
            f"missing {missing}, unexpected {unexpected}, wrong shape {wrong}"
        )
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{weights_path}: weight {name!r} holds NaN or infinity")
    model.load_state_dict(state)
    model.to(device).eval()
    return Checkpoint(model=model, meta=meta, path=version_dir)


def read_latest(checkpoint_dir: Path | str) -> str | None:
    """The version named by ``LATEST``, or None when there is none yet."""
    try:
        name = (Path(checkpoint_dir) / LATEST_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return name or None


def load_latest(checkpoint_dir: Path | str, device: torch.device | str = "cpu") -> Checkpoint:
    """Load the version in service; :class:`CheckpointError` when there is none."""
    root = Path(checkpoint_dir)
    version = read_latest(root)
    if version is None:
        raise CheckpointError(f"no checkpoint in service: {root / LATEST_FILE} does not exist")
    if Path(version).name != version or version.startswith("."):
        raise CheckpointError(f"{root / LATEST_FILE} names an invalid version {version!r}")
    checkpoint = load_checkpoint(root / version, device)
    if checkpoint.meta.version != version:
        raise CheckpointError(
            f"{root / version}/meta.json says version {checkpoint.meta.version!r}, "
            f"LATEST says {version!r}"
        )
    return checkpoint


def promote(checkpoint_dir: Path | str, version: str) -> None:
    """Atomically point ``LATEST`` at ``version`` (which must exist)."""
    root = Path(checkpoint_dir)
    if not (root / version / META_FILE).is_file():
        raise CheckpointError(f"cannot promote {version!r}: {root / version} is not a checkpoint")
    _atomic_write_bytes(root / LATEST_FILE, (version + "\n").encode())
