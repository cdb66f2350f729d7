"""Window snapshots in a compacted state topic, so restoring a partition stays fast.

The changelog idea of Kafka Streams: the state topic (``TICKCAST_STATE_TOPIC``, compacted,
keyed by symbol, co-partitioned with the input topic) holds each symbol's latest window and
per partition a marker: "every snapshot here reflects the input up to offset M". Restoring
input partition p then means: read state partition p, load the windows, and replay the input
only from M to the committed offset, instead of from the beginning of the partition.

Snapshots are taken between two fetches (the windows then reflect exactly the records
below the fetch positions) but written only after those positions are committed, so a
marker never runs ahead of the group's committed offset. Symbol snapshots are acknowledged
before their marker is written. Replaying a tick that a snapshot already holds is harmless:
its ts is not newer, so the window drops it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np

from daemon.publisher import BatchPublisher, OutRecord
from daemon.windows import SymbolWindows, WindowSnapshot

logger = logging.getLogger(__name__)

MAGIC = b"TCS1"
MARKER_MAGIC = b"TCM1"
# Symbols are printable (ticks.py), so this key can never be a symbol's.
MARKER_KEY = b"\x00tickcast.offset"


def snapshot_dtype(window_length: int) -> np.dtype:
    """Binary layout of one symbol's snapshot value (little-endian, fixed size)."""
    return np.dtype(
        [
            ("magic", "S4"),
            ("offset", "<i8"),
            ("count", "<i8"),
            ("last_ts", "<i8"),
            ("window", "<i4"),
            ("prices", "<f8", (window_length,)),
        ]
    )


def encode_snapshot(snapshot: WindowSnapshot, offsets: dict[int, int]) -> list[OutRecord]:
    """One record per symbol; ``offsets[partition]`` is what the state reflects."""
    n, w = snapshot.prices.shape
    dtype = snapshot_dtype(w)
    rows = np.zeros(n, dtype)
    rows["magic"] = MAGIC
    rows["offset"] = [offsets[int(p)] for p in snapshot.partitions.tolist()]
    rows["count"] = snapshot.count
    rows["last_ts"] = snapshot.last_ts
    rows["window"] = w
    rows["prices"] = snapshot.prices
    blob = rows.tobytes()
    size = dtype.itemsize
    return [
        (symbol.encode(), blob[i * size : (i + 1) * size], [])
        for i, symbol in enumerate(snapshot.symbols)
    ]


def encode_marker(offset: int) -> OutRecord:
    return (MARKER_KEY, MARKER_MAGIC + int(offset).to_bytes(8, "little", signed=True), [])


def decode_marker(value: bytes) -> int | None:
    if len(value) != 12 or not value.startswith(MARKER_MAGIC):
        return None
    return int.from_bytes(value[4:], "little", signed=True)


@dataclass
class PartitionState:
    """What the state topic holds for one input partition."""

    snapshot: WindowSnapshot
    offsets: np.ndarray  # int64, the input offset each symbol's snapshot reflects
    marker: int | None  # replay the input from here


def decode_partition_state(
    latest: dict[bytes, bytes], partition: int, window_length: int
) -> PartitionState:
    """Latest value per key of one state partition -> windows to load (bad records skipped)."""
    dtype = snapshot_dtype(window_length)
    marker = None
    keys: list[bytes] = []
    values: list[bytes] = []
    for key, value in latest.items():
        if key == MARKER_KEY:
            marker = decode_marker(value)
        elif len(value) == dtype.itemsize and value.startswith(MAGIC):
            keys.append(key)
            values.append(value)
    rows = np.frombuffer(b"".join(values), dtype) if values else np.zeros(0, dtype)
    valid = rows["window"] == window_length
    keys = [k for k, ok in zip(keys, valid.tolist(), strict=True) if ok]
    rows = rows[valid]
    snapshot = WindowSnapshot(
        symbols=[k.decode("utf-8", "replace") for k in keys],
        partitions=np.full(len(rows), partition, np.int32),
        prices=np.ascontiguousarray(rows["prices"], np.float64).reshape(len(rows), window_length),
        count=rows["count"].astype(np.int64),
        last_ts=rows["last_ts"].astype(np.int64),
    )
    return PartitionState(snapshot, rows["offset"].astype(np.int64), marker)


@dataclass
class PendingSnapshot:
    snapshot: WindowSnapshot
    offsets: dict[int, int]  # input partition -> offset the snapshot reflects


# Symbols encoded and sent at a time. Encoded all at once, the first snapshot of a million
# changed symbols held ~700 MB of records beside the windows (bench v19: RSS 984 -> 1,935
# MiB); in chunks only the snapshot's own copy of the windows stays (~265 B a symbol).
WRITE_CHUNK_SYMBOLS = 10_000


class StateWriter:
    """Writes snapshots in order, in the background: symbols first, then the markers."""

    def __init__(self, publisher: BatchPublisher, topic: str, windows: SymbolWindows) -> None:
        self._publisher = publisher
        self._topic = topic
        self._windows = windows
        self._queue: asyncio.Queue[PendingSnapshot] = asyncio.Queue()
        self._idle = asyncio.Event()  # nothing queued, nothing being written
        self._idle.set()
        self.written = 0

    def submit(self, pending: PendingSnapshot) -> None:
        self._idle.clear()
        self._queue.put_nowait(pending)

    async def wait_idle(self) -> None:
        """Until everything submitted is written (or given up on)."""
        await self._idle.wait()

    def discard_queued(self) -> None:
        """Drop what is not being written yet (its partitions went to another owner)."""
        while not self._queue.empty():
            self._queue.get_nowait()

    async def run(self) -> None:
        while True:
            if self._queue.empty():
                self._idle.set()
            pending = await self._queue.get()
            try:
                await self._write(pending)
            except asyncio.CancelledError:
                # Stopped mid-write (shutdown): its symbols are marked clean but may not
                # be on the topic, and the final snapshot's marker will cover them.
                self._windows.mark_dirty(pending.snapshot.symbols)
                raise
            except Exception as exc:  # keep serving; the next snapshot carries everything
                logger.warning("writing window snapshots failed (%s); will rewrite them all", exc)
                # Snapshots queued behind the failed one were taken before now: they lack its
                # symbols, yet their markers would say the state is complete up to a newer
                # offset. Dropped; the next one is taken with every window dirty.
                self.discard_queued()
                self._windows.dirty[:] = True

    async def flush(self) -> None:
        """Write what is queued (at shutdown)."""
        while not self._queue.empty():
            await self._write(self._queue.get_nowait())

    async def _write(self, pending: PendingSnapshot) -> None:
        snapshot = pending.snapshot
        for start in range(0, len(snapshot), WRITE_CHUNK_SYMBOLS):
            # Each chunk acknowledged before the next is encoded: memory stays bounded.
            part = snapshot.rows(start, start + WRITE_CHUNK_SYMBOLS)
            by_partition: dict[int, list[OutRecord]] = {}
            records = encode_snapshot(part, pending.offsets)
            for record, partition in zip(records, part.partitions.tolist(), strict=True):
                by_partition.setdefault(int(partition), []).append(record)
            deliveries = []
            for partition, items in by_partition.items():
                deliveries += await self._publisher.send_to_partition(self._topic, partition, items)
            await asyncio.gather(*(d.future for d in deliveries))
            self.written += len(records)
        markers = []
        for partition, offset in pending.offsets.items():
            markers += await self._publisher.send_to_partition(
                self._topic, partition, [encode_marker(offset)]
            )
        await asyncio.gather(*(d.future for d in markers))
