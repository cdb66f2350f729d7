"""Checkpoints: ``<dir>/<version>/`` with safetensors weights and ``meta.json``.

safetensors holds raw tensors only, so loading one can never execute code (unlike a
pickle). ``meta.json`` records the architecture, window length, scaling, training data,
evaluation figures and lineage, plus a SHA-256 of the weights so that a truncated or
tampered file is refused; the weights file records the architecture too, so an edit of
``meta.json`` that changes no tensor shape (``residual``, ``window_length``) is refused
as well. ``<dir>/LATEST`` names the version in service and is replaced
atomically: write a temp file, fsync, then ``os.replace`` and fsync the directory, so a
reader never sees half of it, nor (after a power loss) a pointer to empty files.
"""

from __future__ import annotations

import errno
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
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_serializer
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from model.features import MIN_SPAN_RATIO, SCALING_METHOD
from model.gru import ModelConfig, PriceGRU

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
LATEST_FILE = "LATEST"
MAX_LATEST_BYTES = 1024  # a version name and a newline; anything longer is not a pointer
MAX_VERSION_BYTES = 255  # NAME_MAX: a version is one directory name
DIR_MODE = 0o755  # readable by a daemon that runs as another user
FILE_MODE = 0o644
ARCHITECTURE_KEY = "tickcast.architecture"  # in the weights file's safetensors metadata


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
    # Timezone-aware; meta.json holds ``datetime.isoformat()`` (``...+00:00``). Anything
    # else (a naive or free-text time) fails validation, so the checkpoint is refused at
    # load time instead of breaking whoever reads the age later.
    created_at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    weights_file: str = WEIGHTS_FILE
    weights_sha256: str = ""

    @property
    def window_length(self) -> int:
        return self.architecture.window_length

    @field_serializer("created_at", when_used="json")
    def _created_at_iso(self, value: datetime) -> str:
        return value.isoformat()

    def created_at_epoch(self) -> float:
        return self.created_at.timestamp()


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


def _version_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a version (one plain directory name), or None if it can."""
    if not name:
        return "it is empty"
    if "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        return "it contains a path separator"
    if name.startswith("."):
        return "it starts with '.' (hidden, '.' or '..')"
    if not name.isprintable():
        return "it contains control characters"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_VERSION_BYTES:
        return f"it is longer than {MAX_VERSION_BYTES} bytes"
    return None


def _check_version_name(name: str, where: str) -> None:
    problem = _version_name_problem(name)
    if problem is not None:
        raise CheckpointError(f"{where} names an invalid version {name!r}: {problem}")


def _fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` (a rename into it) survive a power loss."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        # A few file systems (some FUSE and network mounts) cannot fsync a directory.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Create ``path`` (which must not exist) holding ``data``, with ``mode``, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Replace ``path`` atomically and durably: temp file, fsync, rename, fsync the dir."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # mkstemp creates it 0600
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(checkpoint_dir: Path | str, model: PriceGRU, meta: CheckpointMeta) -> Path:
    """Write ``<checkpoint_dir>/<meta.version>/`` and return its path (does not promote).

    The version directory is assembled under a temporary name and renamed into place, so
    a watcher never sees a version without both of its files. Files and directories are
    fsynced before and after the rename (a power loss cannot leave a version of empty
    files), and made world-readable (0644 files, 0755 directory) for a daemon that runs
    as another user.
    """
    root = Path(checkpoint_dir)
    _check_version_name(meta.version, "the checkpoint's meta")
    root.mkdir(parents=True, exist_ok=True)
    final = root / meta.version
    if final.exists():
        raise CheckpointError(f"checkpoint version {meta.version!r} already exists in {root}")
    state = {
        name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()
    }
    # The architecture goes into the hashed weights file too: fields that change no tensor
    # shape (residual, window_length) are then still covered by the hash.
    metadata = {
        "format": "pt",
        "version": meta.version,
        ARCHITECTURE_KEY: model.config.model_dump_json(),
    }
    weights = save_safetensors(state, metadata=metadata)
    meta = meta.model_copy(
        update={
            "architecture": model.config,
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
        }
    )
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{meta.version}."))
    try:
        os.chmod(staging, DIR_MODE)  # mkdtemp creates it 0700
        _write_durably(staging / WEIGHTS_FILE, weights)
        _write_durably(staging / META_FILE, (meta.model_dump_json(indent=2) + "\n").encode())
        _fsync_dir(staging)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(root)
    return final


def read_meta(version_dir: Path) -> CheckpointMeta:
    meta_path = version_dir / META_FILE
    try:
        raw = json.loads(meta_path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{meta_path} is missing") from exc
    except OSError as exc:  # PermissionError, IsADirectoryError, EIO
        raise CheckpointError(f"cannot read {meta_path}: {exc.strerror or exc}") from exc
    except (ValueError, RecursionError) as exc:
        # ValueError: bad JSON or UTF-8, or an integer over Python's 4,300-digit limit;
        # RecursionError: nesting deeper than the parser's stack.
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
    architecture (before allocating the model), that architecture against the one saved
    in the weights file (checkpoints written before it was saved there skip this), and
    that every weight is finite.
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
    except OSError as exc:
        raise CheckpointError(f"cannot read {weights_path}: {exc.strerror or exc}") from exc
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
    # Shapes from a model on the meta device: an architecture that does not fit (a
    # hand-edited hidden size of 4096) is refused before gigabytes are allocated for it.
    with torch.device("meta"):
        skeleton = PriceGRU(meta.architecture)
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        wrong = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
        raise CheckpointError(
            f"{weights_path} does not fit architecture {meta.architecture.model_dump()}: "
            f"missing {missing}, unexpected {unexpected}, wrong shape {wrong}"
        )
    saved_with = _saved_architecture(weights)
    if saved_with is not None and saved_with != meta.architecture:
        raise CheckpointError(
            f"{version_dir / META_FILE}: architecture {meta.architecture.model_dump()} differs "
            f"from the one saved with the weights {saved_with.model_dump()}: tampered"
        )
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{weights_path}: weight {name!r} holds NaN or infinity")
    model = PriceGRU(meta.architecture)
    model.load_state_dict(state)
    model.to(device).eval()
    return Checkpoint(model=model, meta=meta, path=version_dir)


def _saved_architecture(weights: bytes) -> ModelConfig | None:
    """The architecture recorded in a safetensors file's metadata, or None (before it was).

    ``weights`` has already been parsed by safetensors, so its header (an 8-byte
    little-endian length, then that much JSON) is known to be well formed.
    """
    header_length = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8 : 8 + header_length])
    recorded = header.get("__metadata__", {}).get(ARCHITECTURE_KEY)
    if recorded is None:
        return None
    try:
        return ModelConfig.model_validate_json(recorded)
    except ValidationError as exc:
        raise CheckpointError(f"the architecture saved with the weights is invalid: {exc}") from exc


def read_latest(checkpoint_dir: Path | str) -> str | None:
    """The version named by ``LATEST``, or None when there is no ``LATEST`` yet.

    Raises :class:`CheckpointError` when ``LATEST`` exists but names no valid version:
    it cannot be read (a directory, permissions, I/O error), holds NUL bytes (zero-filled
    after a crash), is not UTF-8, is empty, or names something that is not one plain
    directory name (path separators, '..', a hidden name, control characters).
    """
    path = Path(checkpoint_dir) / LATEST_FILE
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_LATEST_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:  # IsADirectoryError, NotADirectoryError, PermissionError, EIO
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if b"\0" in raw:
        raise CheckpointError(f"{path} holds NUL bytes (zero-filled after a crash?): {raw[:32]!r}")
    if len(raw) > MAX_LATEST_BYTES:
        raise CheckpointError(f"{path} is longer than {MAX_LATEST_BYTES} bytes: not a pointer")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not UTF-8 text: {raw[:32]!r}") from exc
    name = text.strip()
    if not name:
        raise CheckpointError(f"{path} is empty: it names no version")
    _check_version_name(name, str(path))
    return name


def load_latest(checkpoint_dir: Path | str, device: torch.device | str = "cpu") -> Checkpoint:
    """Load the version in service; :class:`CheckpointError` when there is none."""
    root = Path(checkpoint_dir)
    version = read_latest(root)  # validates the name
    if version is None:
        raise CheckpointError(f"no checkpoint in service: {root / LATEST_FILE} does not exist")
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
    _check_version_name(version, "promote")
    if not (root / version / META_FILE).is_file():
        raise CheckpointError(f"cannot promote {version!r}: {root / version} is not a checkpoint")
    _atomic_write_bytes(root / LATEST_FILE, (version + "\n").encode())
