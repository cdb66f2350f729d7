"""Window snapshots: binary round trip, markers, and windows loaded exactly."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from daemon.state_store import (
    MARKER_KEY,
    PendingSnapshot,
    SharedStateProducer,
    StateWriter,
    decode_marker,
    decode_partition_state,
    encode_marker,
    encode_snapshot,
)
from daemon.windows import SymbolWindows
from model.data import load_series


def take(writer: StateWriter, positions: dict[int, int]) -> PendingSnapshot:
    pending = writer.take(positions)
    assert pending is not None
    return pending


def filled_windows(window_length: int = 60) -> SymbolWindows:
    series = load_series("dataset:nasdaq")[0]
    wins = SymbolWindows(window_length)
    symbols = ["A"] * 100 + ["B"] * 30  # B's window is not full yet
    prices = np.r_[series.prices[:100], series.prices[200:230]]
    ts = np.r_[series.ts[:100], series.ts[:30]]
    slots = wins.slots_for(symbols, np.full(130, 2, np.int32))
    wins.apply(slots, prices, ts)
    return wins


def test_snapshot_round_trip_restores_identical_windows():
    wins = filled_windows()
    snap = wins.take_snapshot({2: 130}).snapshot
    assert sorted(snap.symbols) == ["A", "B"]
    assert not wins.dirty.any()  # taking a snapshot marks the symbols clean
    records = encode_snapshot(snap)
    latest = {key: value for key, value, _ in [*records, encode_marker(130, 60)] if key is not None}
    state = decode_partition_state(latest, partition=2, window_length=60)
    assert state.marker == 130
    assert (state.snapshot.offsets == 130).all()
    fresh = SymbolWindows(60)
    fresh.load(state.snapshot)
    for symbol in ("A", "B"):
        np.testing.assert_array_equal(fresh.window(symbol), wins.window(symbol))
        slot_new, slot_old = fresh.slot_of(symbol), wins.slot_of(symbol)
        assert fresh.last_ts[slot_new] == wins.last_ts[slot_old]
        assert fresh.count[slot_new] == wins.count[slot_old]


def test_only_changed_symbols_of_the_asked_partitions_are_snapshotted():
    wins = filled_windows()
    wins.take_snapshot({2: 130})
    slots = wins.slots_for(["A", "C"], np.array([2, 5], np.int32))
    wins.apply(slots, np.array([1.0, 2.0]), np.array([2_000_000_000_000, 1]))
    snap = wins.take_snapshot({2: 131}).snapshot
    assert snap.symbols == ["A"]
    assert wins.take_snapshot({5: 1}).snapshot.symbols == ["C"]


def test_garbage_and_other_window_lengths_are_ignored():
    wins = filled_windows()
    good = encode_snapshot(wins.take_snapshot({2: 10}).snapshot)
    short = filled_windows(30)
    other = encode_snapshot(short.take_snapshot({2: 10}).snapshot)
    (good_key, good_value, _), (other_key, other_value, _) = good[0], other[1]
    assert good_key is not None
    assert other_key is not None
    latest = {good_key: good_value, b"X": b"junk", other_key + b"2": other_value}
    latest[MARKER_KEY] = b"nonsense"
    state = decode_partition_state(latest, partition=2, window_length=60)
    assert state.snapshot.symbols == [good_key.decode()]
    assert state.marker is None


class FlakyPublisher:
    """Fails the first send, then acknowledges everything; records what reached it."""

    def __init__(self) -> None:
        self.failed = False
        self.sent: list[tuple[int, bytes | None]] = []

    async def send_to_partition(self, topic: str, partition: int, records: list) -> list:
        import asyncio
        from types import SimpleNamespace

        if not self.failed:
            self.failed = True
            raise ConnectionError("broker gone")
        self.sent += [(partition, key) for key, _, _ in records]
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return [SimpleNamespace(future=done)]


async def test_a_failed_write_drops_the_snapshots_queued_behind_it():
    """After a failure, no marker may claim state that was never written: the round
    queued behind the failed one counted on it and is dropped; the failed round's symbols
    are unsaved again, so the next round writes them all and then its marker."""
    import asyncio

    wins = filled_windows()
    publisher = FlakyPublisher()
    writer = StateWriter(SharedStateProducer(publisher), "ticks.state", wins)  # type: ignore[arg-type]
    writer.submit(take(writer, {2: 130}))  # A and B: fails
    slots = wins.slots_for(["A"], np.array([2], np.int32))
    wins.apply(slots, np.array([1.0]), np.array([2_000_000_000_000]))
    writer.submit(take(writer, {2: 131}))  # only A
    task = asyncio.create_task(writer.run())
    await asyncio.wait_for(writer.wait_idle(), 10)
    assert publisher.failed and publisher.sent == []  # the snapshot of A alone: dropped
    a, b = wins.slot_of("A"), wins.slot_of("B")
    assert a is not None and b is not None
    assert wins.dirty[a] and wins.dirty[b]  # to be written again
    writer.submit(take(writer, {2: 131}))
    await asyncio.wait_for(writer.wait_idle(), 10)
    task.cancel()
    assert sorted(publisher.sent) == sorted([(2, b"A"), (2, b"B"), (2, MARKER_KEY)])
    assert publisher.sent[-1] == (2, MARKER_KEY)  # symbols first, then the marker


class GatedPublisher:
    """Acknowledges sends only once ``open`` is set; records what reached it."""

    def __init__(self) -> None:
        import asyncio

        self.open = asyncio.Event()
        self.sending = asyncio.Event()
        self.sent: list[tuple[int, bytes | None]] = []

    async def send_to_partition(self, topic: str, partition: int, records: list) -> list:

        self.sending.set()
        await self.open.wait()
        self.sent += [(partition, key) for key, _, _ in records]
        return []  # acknowledged already


async def test_wait_idle_returns_once_everything_submitted_is_written():
    """A revocation waits for this, so the old owner's snapshots land before the new
    owner's restore reads the state topic."""
    import asyncio

    wins = filled_windows()
    publisher = GatedPublisher()
    writer = StateWriter(SharedStateProducer(publisher), "ticks.state", wins)  # type: ignore[arg-type]
    await asyncio.wait_for(writer.wait_idle(), 1)  # nothing submitted: idle
    task = asyncio.create_task(writer.run())
    writer.submit(take(writer, {2: 130}))
    idle = asyncio.create_task(writer.wait_idle())
    await asyncio.wait_for(publisher.sending.wait(), 10)
    assert not idle.done(), "idle while a snapshot is being written"
    publisher.open.set()
    await asyncio.wait_for(idle, 10)
    assert publisher.sent[-1] == (2, MARKER_KEY)
    task.cancel()


async def test_a_write_cut_short_at_shutdown_leaves_its_symbols_dirty():
    """Shutdown cancels the writer; the final snapshot (whose marker covers these
    symbols' offsets) must carry the symbols the cut-short write may not have written."""
    import asyncio

    wins = filled_windows()
    publisher = GatedPublisher()
    writer = StateWriter(SharedStateProducer(publisher), "ticks.state", wins)  # type: ignore[arg-type]
    task = asyncio.create_task(writer.run())
    writer.submit(take(writer, {2: 130}))
    assert not wins.dirty.any()  # taken: marked clean
    await asyncio.wait_for(publisher.sending.wait(), 10)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    a, b = wins.slot_of("A"), wins.slot_of("B")
    assert a is not None and b is not None
    assert wins.dirty[a] and wins.dirty[b]
    assert sorted(wins.take_snapshot({2: 130}).snapshot.symbols) == ["A", "B"]


async def test_a_large_snapshot_is_written_a_chunk_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Encoded all at once, a snapshot of a million changed symbols held ~700 MB of
    records beside the windows; each chunk is now acknowledged before the next is encoded,
    and the marker goes last."""
    import asyncio
    from types import SimpleNamespace

    import daemon.state_store as state_store

    monkeypatch.setattr(state_store, "WRITE_CHUNK_SYMBOLS", 7)
    series = load_series("dataset:nasdaq")[0]
    wins = SymbolWindows(60)
    names = [f"S{i}" for i in range(20)]
    slots = wins.slots_for(names, np.array([i % 2 for i in range(20)], np.int32))
    wins.apply(slots, series.prices[:20], np.arange(1, 21, dtype=np.int64))

    class Acknowledging:
        def __init__(self) -> None:
            self.unacknowledged: list[bytes | None] = []
            self.most_unacknowledged = 0
            self.sent: list[bytes | None] = []

        async def send_to_partition(self, topic: str, partition: int, records: list) -> list:
            keys = [key for key, _, _ in records]
            self.unacknowledged += keys
            self.most_unacknowledged = max(self.most_unacknowledged, len(self.unacknowledged))
            self.sent += keys
            done = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(self._acknowledge, done, keys)
            return [SimpleNamespace(future=done)]

        def _acknowledge(self, done: asyncio.Future[None], keys: list[bytes | None]) -> None:
            for key in keys:
                self.unacknowledged.remove(key)
            done.set_result(None)

    publisher = Acknowledging()
    writer = StateWriter(SharedStateProducer(publisher), "ticks.state", wins)  # type: ignore[arg-type]
    task = asyncio.create_task(writer.run())
    writer.submit(take(writer, {0: 10, 1: 10}))
    await asyncio.wait_for(writer.wait_idle(), 10)
    task.cancel()
    symbols = [k for k in publisher.sent if k is not None and k != MARKER_KEY]
    assert sorted(symbols) == sorted(n.encode() for n in names)
    assert publisher.sent[-2:] == [MARKER_KEY, MARKER_KEY]  # one per partition, last
    assert publisher.most_unacknowledged <= 7
    assert writer.written == 20


class TopicPublisher:
    """Keeps the latest value per key of each partition, as compaction does; fails
    every ``fail_every``-th send (a broker hiccup), acknowledges the rest at once."""

    def __init__(self, fail_every: int) -> None:
        self.fail_every = fail_every
        self.sends = 0
        self.topic: dict[int, dict[bytes, bytes]] = {}

    async def send_to_partition(self, topic: str, partition: int, records: list) -> list:
        import asyncio
        from types import SimpleNamespace

        self.sends += 1
        if self.sends % self.fail_every == 0:
            raise ConnectionError("broker hiccup")
        self.topic.setdefault(partition, {}).update((k, v) for k, v, _ in records)
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return [SimpleNamespace(future=done)]


def restored_from(
    topic: dict[bytes, bytes],
    partition: int,
    log: list[tuple[str, float, int]],
    base: int,
    end: int,
) -> SymbolWindows:
    """What a new owner rebuilds: the snapshots, then the input from the marker to end
    (``log[i]`` is the record at offset ``base + i``)."""
    state = decode_partition_state(topic, partition, window_length=20)
    assert state.marker is not None and base <= state.marker <= end
    fresh = SymbolWindows(20)
    fresh.load(state.snapshot)
    tail = log[state.marker - base : end - base]
    if tail:
        symbols, prices, ts = (list(x) for x in zip(*tail, strict=True))
        offsets = np.arange(state.marker, end, dtype=np.int64)
        slots = fresh.slots_for(symbols, np.full(len(tail), partition, np.int32), offsets)
        fresh.apply(slots, np.asarray(prices), np.asarray(ts, np.int64))
    return fresh


async def test_bounded_rounds_restore_every_window_exactly_whatever_is_given_up():
    """Rounds of at most 7 of 40 changing symbols, with writes failing, rounds not
    committed (given up), two rounds queued at once and rounds taken before an earlier one
    was given up: after every write, snapshots + replay from the marker rebuild every
    window exactly. Partition 1's offsets start a billion higher and partition 0 changes
    more symbols per fetch than a round takes: both markers must still advance."""
    import asyncio

    rng = np.random.default_rng(7)
    prices = load_series("dataset:nasdaq")[0].prices
    symbols = [f"S{i:02d}" for i in range(40)]
    partition_of = {s: i % 2 for i, s in enumerate(symbols)}
    base = {0: 0, 1: 1_000_000_000}
    fetch_size = {0: 16, 1: 4}
    # Each symbol's real price path (offset per symbol), ticking in a random interleaving.
    order = rng.permutation(np.repeat(np.arange(40), 45))
    logs: dict[int, list[tuple[str, float, int]]] = {0: [], 1: []}
    seen = np.zeros(40, np.int64)
    for k in order.tolist():
        logs[partition_of[symbols[k]]].append(
            (symbols[k], float(prices[k * 50 + seen[k]]), int(1_000 + seen[k]))
        )
        seen[k] += 1
    live = SymbolWindows(20)
    publisher = TopicPublisher(fail_every=5)
    writer = StateWriter(SharedStateProducer(publisher), "ticks.state", live)  # type: ignore[arg-type]
    task = asyncio.create_task(writer.run())
    positions = dict(base)
    held: list[PendingSnapshot] = []  # taken, not yet submitted (awaiting a "commit")
    checked = 0
    marker_moves = {0: 0, 1: 0}
    last_markers: dict[int, int | None] = {0: None, 1: None}

    def check_restores() -> int:
        compared = 0
        for p in (0, 1):
            marker = decode_marker(publisher.topic.get(p, {}).get(MARKER_KEY, b""))
            if marker is None:
                continue
            if positions[0] < base[0] + len(logs[0]):  # while partition 0 still floods
                marker_moves[p] += marker != last_markers[p]
            last_markers[p] = marker
            fresh = restored_from(publisher.topic[p], p, logs[p], base[p], positions[p])
            for symbol in (s for s in symbols if partition_of[s] == p and s in live):
                got, want = fresh.window(symbol), live.window(symbol)
                assert got is not None and want is not None, symbol
                np.testing.assert_array_equal(got, want, err_msg=symbol)
                compared += 1
        return compared

    def fed() -> bool:
        return all(positions[p] == base[p] + len(logs[p]) for p in (0, 1))

    try:
        while not fed() or held:
            for p in (0, 1):  # one fetch per partition
                at = positions[p] - base[p]
                fetch = logs[p][at : at + fetch_size[p]]
                if fetch:
                    syms, px, ts = (list(x) for x in zip(*fetch, strict=True))
                    offsets = np.arange(positions[p], positions[p] + len(fetch), dtype=np.int64)
                    slots = live.slots_for(syms, np.full(len(fetch), p, np.int32), offsets)
                    live.apply(slots, np.asarray(px), np.asarray(ts, np.int64))
                    positions[p] += len(fetch)
            if not fed() and (pending := writer.take(dict(positions), max_symbols=7)):
                held.append(pending)
            # Sometimes two rounds are taken before the first is committed or given up,
            # and sometimes both are queued before the writer gets to them.
            if len(held) == 2 and rng.random() < 0.5:
                writer.submit(held.pop(0))
                writer.submit(held.pop(0))
                await asyncio.wait_for(writer.wait_idle(), 10)
            elif held and (len(held) == 2 or rng.random() < 0.6 or fed()):
                first = held.pop(0)
                if rng.random() < 0.2:
                    writer.give_up(first)  # its commit failed
                else:
                    writer.submit(first)
                await asyncio.wait_for(writer.wait_idle(), 10)
            checked += check_restores()
        # No new ticks: rounds catch up and the markers reach the ends of the input.
        for _ in range(200):
            if (pending := writer.take(dict(positions), max_symbols=7)) is not None:
                writer.submit(pending)
                await asyncio.wait_for(writer.wait_idle(), 10)
                checked += check_restores()
    finally:
        task.cancel()
    assert publisher.sends >= 50 and checked > 1000
    assert min(marker_moves.values()) > 5, f"markers must advance: {marker_moves}"
    assert not live.dirty.any()
    for p in (0, 1):
        state = decode_partition_state(publisher.topic[p], p, 20)
        assert state.marker == base[p] + len(logs[p])
