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

A round saves at most TICKCAST_SNAPSHOT_MAX_SYMBOLS symbols, those furthest behind their
partition's position first, so its copy of the windows stays small with a million symbols;
its markers are then held back
to the oldest offset a still-unsaved symbol needs replayed from. Rounds are written in the
order they were taken, and each round's markers count on every earlier round being on the
topic. A round that is given up (its write failed, was cut short, or its offsets were not
committed) makes its symbols unsaved again; rounds taken while it was pending still write
their symbols, which stay valid, but not their markers.

Fencing. A write can outlive its owner's hold on the partition: a revocation whose drain
timed out, or an instance cut off from the group but not from the broker, may land a round
after the next owner restored and wrote newer snapshots, and compaction would then keep the
older window under the newer marker. So each state partition is written by its own
transactional producer (Kafka Streams' first exactly-once design), its id the same for
every owner: the next owner's InitProducerId aborts a write still open and fences the old
producer, and restores read committed records only. Brokers without transactions (Tansu)
and TICKCAST_STATE_FENCING=false write through one plain producer instead, unfenced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from daemon.clients import stop_client
from daemon.publisher import BatchPublisher, OutRecord
from daemon.windows import SnapshotRound, SymbolWindows, WindowSnapshot

logger = logging.getLogger(__name__)

MAGIC = b"TCS1"
# A marker: TCM2, the offset, and the window length of the daemon that wrote it (TCM1, the
# offset alone, is what daemons before it wrote; it is still read).
MARKER_MAGIC = b"TCM2"
MARKER_MAGIC_V1 = b"TCM1"
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


def encode_snapshot(snapshot: WindowSnapshot) -> list[OutRecord]:
    """One record per symbol."""
    n, w = snapshot.prices.shape
    dtype = snapshot_dtype(w)
    rows = np.zeros(n, dtype)
    rows["magic"] = MAGIC
    rows["offset"] = snapshot.offsets
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


def encode_marker(offset: int, window_length: int) -> OutRecord:
    value = (
        MARKER_MAGIC
        + int(offset).to_bytes(8, "little", signed=True)
        + int(window_length).to_bytes(4, "little")
    )
    return (MARKER_KEY, value, [])


def decode_marker(value: bytes) -> int | None:
    """The offset a marker holds (either format), or None if it is no marker."""
    if (len(value), value[:4]) not in ((16, MARKER_MAGIC), (12, MARKER_MAGIC_V1)):
        return None
    return int.from_bytes(value[4:12], "little", signed=True)


def marker_window_length(value: bytes) -> int | None:
    """The window length of the daemon that wrote a marker; None for a TCM1 marker."""
    if decode_marker(value) is None or len(value) != 16:
        return None
    return int.from_bytes(value[12:], "little")


@dataclass
class PartitionState:
    """What the state topic holds for one input partition."""

    snapshot: WindowSnapshot
    marker: int | None  # replay the input from here
    # Symbol records that cannot be loaded (damaged, or of another window length than the
    # marker's writer served): the marker counts on their windows, so it cannot be trusted
    # while one is there.
    unusable: int = 0
    # Records of another window length written before a marker of this length: the marker
    # does not count on them (a symbol its writer had a window for was saved at this
    # length, or holds the marker back to where a replay rebuilds it), so they are ignored.
    stale: int = 0


def decode_partition_state(
    latest: dict[bytes, bytes],
    partition: int,
    window_length: int,
    written_at: dict[bytes, int] | None = None,
) -> PartitionState:
    """Latest value per key of one state partition -> windows to load (bad records skipped).

    ``written_at``: each key's offset in the state partition. A record of another window
    length is stale only if it was written before the marker (of this length): one written
    after it, by a daemon of the other length whose marker never followed (it was killed
    first, unfenced), replaced a snapshot the marker counts on. Without offsets, none is.
    """
    dtype = snapshot_dtype(window_length)
    marker = None
    keys: list[bytes] = []
    values: list[bytes] = []
    damaged = before_marker = after_marker = 0
    marker_window = None
    marker_at = (written_at or {}).get(MARKER_KEY)
    for key, value in latest.items():
        if key == MARKER_KEY:
            marker, marker_window = decode_marker(value), marker_window_length(value)
        elif len(value) == dtype.itemsize and value.startswith(MAGIC):
            keys.append(key)
            values.append(value)
        elif _other_window_length(value, window_length):
            at = (written_at or {}).get(key)
            if marker_at is not None and at is not None and at < marker_at:
                before_marker += 1
            else:
                after_marker += 1
        else:
            damaged += 1
    rows = np.frombuffer(b"".join(values), dtype) if values else np.zeros(0, dtype)
    valid = rows["window"] == window_length
    damaged += int((~valid).sum())
    keys = [k for k, ok in zip(keys, valid.tolist(), strict=True) if ok]
    rows = rows[valid]
    snapshot = WindowSnapshot(
        symbols=[k.decode("utf-8", "replace") for k in keys],
        partitions=np.full(len(rows), partition, np.int32),
        prices=np.ascontiguousarray(rows["prices"], np.float64).reshape(len(rows), window_length),
        count=rows["count"].astype(np.int64),
        last_ts=rows["last_ts"].astype(np.int64),
        offsets=rows["offset"].astype(np.int64),
    )
    if marker_window == window_length:
        return PartitionState(snapshot, marker, damaged + after_marker, stale=before_marker)
    return PartitionState(snapshot, marker, damaged + after_marker + before_marker)


SNAPSHOT_HEADER_BYTES = snapshot_dtype(0).itemsize  # magic, offset, count, last_ts, window


def _other_window_length(value: bytes, window_length: int) -> bool:
    """A well-formed snapshot record of a window length other than ``window_length``."""
    header = SNAPSHOT_HEADER_BYTES
    if len(value) <= header or not value.startswith(MAGIC):
        return False
    length = int.from_bytes(value[header - 4 : header], "little", signed=True)
    return length != window_length and len(value) == header + 8 * length


@dataclass
class PendingSnapshot:
    """A round on its way to the state topic."""

    round: SnapshotRound
    generation: int  # the writer's when taken; a later one: a round before it was given up
    settled: bool = False  # written, or given up on
    written: bool = False

    @property
    def snapshot(self) -> WindowSnapshot:
        return self.round.snapshot


# Symbols of a round encoded and sent at a time (each record ~600 B while encoded). Encoded
# all at once, the first snapshot of a million changed symbols held ~700 MB of records
# beside the windows (bench v19: RSS 984 -> 1,935 MiB).
WRITE_CHUNK_SYMBOLS = 5_000


class PartitionNotHeldError(KafkaError):
    """A round reached a state partition this instance no longer writes."""


class StateProducers(Protocol):
    """Who writes each state partition, and how one round's writes are made atomic."""

    def publisher(self, partition: int) -> BatchPublisher: ...

    def transactions(
        self, partitions: Iterable[int]
    ) -> contextlib.AbstractAsyncContextManager[set[int]]:
        """Around one round: the partitions it may write (its records on them land together
        or not at all); records for the others are left out."""
        ...

    async def acquire(self, partitions: Iterable[int]) -> None:
        """Before restoring these partitions: fence whoever wrote them before."""
        ...

    async def release(self, partitions: Iterable[int], timeout_s: float) -> None:
        """These partitions went to another owner (or back to the group)."""
        ...

    async def stop(self, timeout_s: float) -> None: ...


class SharedStateProducer:
    """Every state partition through one plain producer's publisher: no fencing. (The
    producer itself is started and stopped by its owner.)"""

    def __init__(self, publisher: BatchPublisher) -> None:
        self._publisher = publisher

    def publisher(self, partition: int) -> BatchPublisher:
        return self._publisher

    @contextlib.asynccontextmanager
    async def transactions(self, partitions: Iterable[int]) -> AsyncIterator[set[int]]:
        yield set(partitions)

    async def acquire(self, partitions: Iterable[int]) -> None:
        pass

    async def release(self, partitions: Iterable[int], timeout_s: float) -> None:
        pass

    async def stop(self, timeout_s: float) -> None:
        pass


# aiokafka retries InitProducerId for good while no transaction coordinator answers (e.g.
# fewer brokers than transaction.state.log.replication.factor): give up and say why.
START_TIMEOUT_S = 30.0
# How long a round waits for a commit or an abort. aiokafka sees one through even when
# its caller stops waiting (and never, once the producer is stopped): past this the round
# fails and the next one waits for it again, before it begins on that writer.
END_TIMEOUT_S = 5.0
DROPPED_STOP_S = 1.0  # a dropped writer is broken anyway: do not wait for its flush


@dataclass(eq=False)
class _Writer:
    """One state partition's transactional producer."""

    producer: AIOKafkaProducer
    publisher: BatchPublisher
    ending: asyncio.Future[None] | None = None  # its last commit or abort, until seen done


class FencedStateProducers:
    """One transactional producer per state partition held, ``make(partition)`` built with
    a transactional id that every owner of that partition shares (see module doc).

    A writer that fails (fenced by a newer owner, or broken) is dropped and counted
    (``on_drop``), never started again here: re-initialising it could fence the
    partition's rightful owner and let this instance commit a stale round. Until the
    partition is assigned here again, its state stays as last committed (consistent
    snapshots and marker, from which the next owner replays). A commit or abort that is
    merely slow fails its round (given up, written again later) but keeps the writer."""

    def __init__(
        self,
        make: Callable[[int], AIOKafkaProducer],
        *,
        on_drop: Callable[[], None] = lambda: None,
        start_timeout_s: float = START_TIMEOUT_S,
        end_timeout_s: float = END_TIMEOUT_S,
    ) -> None:
        self._make = make
        self._on_drop = on_drop
        self._start_timeout_s = start_timeout_s
        self._end_timeout_s = end_timeout_s
        self._held: dict[int, _Writer] = {}

    def publisher(self, partition: int) -> BatchPublisher:
        writer = self._held.get(partition)
        if writer is None:
            raise PartitionNotHeldError(f"state partition {partition} is not held here")
        return writer.publisher

    def _still_holds(self, partition: int, writer: _Writer) -> bool:
        return self._held.get(partition) is writer

    @contextlib.asynccontextmanager
    async def transactions(self, partitions: Iterable[int]) -> AsyncIterator[set[int]]:
        """One transaction per partition held, committed together on success, aborted on
        failure; partitions not held, or whose writer is fenced, are left out. A writer
        whose last commit or abort is still running fails the round (KafkaError)."""
        begun: dict[int, _Writer] = {}
        try:
            for partition in sorted(set(partitions)):
                writer = self._held.get(partition)
                if writer is None or not await self._settled(partition, writer):
                    continue
                try:
                    await writer.producer.begin_transaction()
                except Exception as exc:  # fenced (aiokafka asserts a ready producer)
                    await self._drop(partition, writer, exc)
                    continue
                begun[partition] = writer
            yield set(begun)
        except BaseException:
            # The round's own error (or cancellation) is what goes on, not the aborts'.
            await asyncio.gather(
                *(self._end(p, w, "abort") for p, w in begun.items()), return_exceptions=True
            )
            raise
        # Each partition carries its own symbols and marker: the commits that succeed stand.
        results = await asyncio.gather(
            *(self._end(p, w, "commit") for p, w in begun.items()), return_exceptions=True
        )
        for result in results:
            if result is not None:
                raise result

    async def _settled(self, partition: int, writer: _Writer) -> bool:
        """Wait for the writer's last commit or abort: True once it ended well, False when
        it failed (the writer is dropped); KafkaError while it still runs."""
        ending = writer.ending
        if ending is None:
            return True
        await asyncio.wait({ending}, timeout=self._end_timeout_s)
        if not ending.done():
            raise KafkaError(f"state partition {partition}: its last transaction has not ended")
        writer.ending = None
        failure = ending.exception()
        if failure is not None:
            await self._drop(partition, writer, failure)
            return False
        return True

    async def _end(self, partition: int, writer: _Writer, how: str) -> BaseException | None:
        """Commit or abort the writer's transaction; the error that fails the round, if
        any. A writer released meanwhile is left alone: the next owner aborts it."""
        if not self._still_holds(partition, writer):
            return None
        producer = writer.producer
        end = producer.commit_transaction if how == "commit" else producer.abort_transaction
        writer.ending = ending = asyncio.ensure_future(end())
        if not await self._settled(partition, writer):
            return ending.exception()  # the writer is dropped
        return None

    async def _drop(self, partition: int, writer: _Writer, exc: BaseException) -> None:
        if self._still_holds(partition, writer):
            del self._held[partition]
            self._on_drop()
            logger.warning(
                "state partition %d: its writer failed (%r); no snapshots of it until it is "
                "assigned here again (tickcast_state_writers_dropped_total)",
                partition,
                exc,
            )
        await stop_client(writer.producer, DROPPED_STOP_S)

    async def acquire(self, partitions: Iterable[int]) -> None:
        todo = sorted(set(partitions) - set(self._held))
        try:
            async with asyncio.TaskGroup() as group:
                for partition in todo:
                    group.create_task(self._acquire_one(partition))
        except ExceptionGroup as failed:
            # Starts still running were cancelled and closed; those done stay held until
            # released (the failed restore stops the daemon).
            raise failed.exceptions[0] from None

    async def _acquire_one(self, partition: int) -> None:
        producer = self._make(partition)
        try:
            async with asyncio.timeout(self._start_timeout_s):
                # A transactional producer's start waits for InitProducerId: from here on
                # the previous owner's open write is aborted and its producer fenced.
                await producer.start()
        except BaseException as exc:
            await stop_client(producer, DROPPED_STOP_S)
            if isinstance(exc, Exception):
                raise KafkaError(
                    f"state partition {partition}: its transactional writer did not start "
                    f"({exc!r}); fencing needs transactions (TICKCAST_STATE_FENCING=false "
                    "writes snapshots unfenced)"
                ) from exc
            raise
        self._held[partition] = _Writer(producer, BatchPublisher(producer))

    async def release(self, partitions: Iterable[int], timeout_s: float) -> None:
        gone = [self._held.pop(p).producer for p in set(partitions) if p in self._held]
        await asyncio.gather(*(stop_client(producer, timeout_s) for producer in gone))

    async def stop(self, timeout_s: float) -> None:
        await self.release(list(self._held), timeout_s)


async def acknowledged(futures: list[asyncio.Future[Any]]) -> None:
    """Wait for every delivery and raise the first failure. Unlike gather, a wait that is
    cancelled leaves the producer's futures alone: an abort still sees its batches through
    before it ends the transaction."""
    if futures:
        await asyncio.wait(futures)
        for future in futures:
            future.result()


class StateWriter:
    """Writes snapshot rounds in order, in the background: symbols first, then markers."""

    def __init__(self, producers: StateProducers, topic: str, windows: SymbolWindows) -> None:
        self._producers = producers
        self._topic = topic
        self._windows = windows
        self._queue: asyncio.Queue[PendingSnapshot] = asyncio.Queue()
        self._idle = asyncio.Event()  # nothing queued, nothing being written
        self._idle.set()
        self._current: asyncio.Future[None] | None = None  # the round being written
        # Bumped whenever a round is given up: rounds taken before then write no markers.
        self._generation = 0
        self.written = 0

    def take(
        self, positions: dict[int, int], max_symbols: int | None = None
    ) -> PendingSnapshot | None:
        """The next round (None when no symbol of these partitions changed)."""
        taken = self._windows.take_snapshot(positions, max_symbols)
        if not len(taken.snapshot):
            return None
        return PendingSnapshot(taken, self._generation)

    def submit(self, pending: PendingSnapshot) -> None:
        self._idle.clear()
        self._queue.put_nowait(pending)

    def give_up(self, pending: PendingSnapshot) -> None:
        """This round will not be written: its symbols are unsaved again, and no round
        taken before now may write its markers (they counted on this one)."""
        if not pending.settled:
            pending.settled = True
            self._windows.mark_unsaved(pending.snapshot, pending.round.previous)
        self._generation += 1

    async def wait_idle(self) -> None:
        """Until everything submitted is written (or given up on)."""
        await self._idle.wait()

    def discard_queued(self) -> None:
        """Give up what is not being written yet (its partitions went to another owner)."""
        while not self._queue.empty():
            self.give_up(self._queue.get_nowait())

    def abandon_current(self) -> None:
        """Cut the round being written short (its partitions went to another owner while it
        hung): it is given up, and the writer goes on with the next."""
        if self._current is not None and not self._current.done():
            self._current.cancel()

    async def run(self) -> None:
        while True:
            if self._queue.empty():
                self._idle.set()
            pending = await self._queue.get()
            self._current = write = asyncio.ensure_future(self._write(pending))
            try:
                await write
            except asyncio.CancelledError:
                # Stopped mid-write (shutdown), or the write abandoned: its symbols may not
                # be on the topic; later rounds carry them. (A write that did finish
                # just before the stop stands.)
                if not (write.done() and not write.cancelled() and write.exception() is None):
                    self.give_up(pending)
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
            except Exception as exc:  # keep serving; later rounds carry its symbols
                logger.warning("writing window snapshots failed (%s); will rewrite them", exc)
                self.give_up(pending)
                self.discard_queued()
            finally:
                self._current = None

    async def flush(self) -> None:
        """Write what is queued (at shutdown)."""
        while not self._queue.empty():
            await self._write(self._queue.get_nowait())

    async def _write(self, pending: PendingSnapshot) -> None:
        snapshot = pending.snapshot
        partitions = set(snapshot.partitions.tolist()) | set(pending.round.markers)
        written = 0
        async with self._producers.transactions(partitions) as writable:
            for start in range(0, len(snapshot), WRITE_CHUNK_SYMBOLS):
                # Each chunk acknowledged before the next is encoded: memory stays bounded.
                part = snapshot.rows(start, start + WRITE_CHUNK_SYMBOLS)
                by_partition: dict[int, list[OutRecord]] = {}
                records = encode_snapshot(part)
                for record, partition in zip(records, part.partitions.tolist(), strict=True):
                    if partition in writable:
                        by_partition.setdefault(int(partition), []).append(record)
                deliveries = []
                for partition, items in by_partition.items():
                    publisher = self._producers.publisher(partition)
                    deliveries += await publisher.send_to_partition(self._topic, partition, items)
                    written += len(items)
                await acknowledged([d.future for d in deliveries])
            # A round given up after this one was taken (its write included): these
            # markers would count on it. The next round taken since then writes correct ones.
            counted_on_lost = pending.generation != self._generation
            sent = []
            for partition, offset in ({} if counted_on_lost else pending.round.markers).items():
                if partition not in writable:
                    continue
                sent += await self._producers.publisher(partition).send_to_partition(
                    self._topic, partition, [encode_marker(offset, self._windows.window_length)]
                )
            await acknowledged([d.future for d in sent])
        self.written += written
        pending.settled = pending.written = True
