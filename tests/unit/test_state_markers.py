"""State-topic markers and snapshots: round trips and malformed values.

``encode_marker``/``decode_marker`` (the "state reflects the input up to offset M" record,
malformed values read as no marker) and the parts of the
``encode_snapshot``/``decode_partition_state`` round trip that test_state_store.py leaves
out: symbols of several partitions, non-ASCII symbols, and an empty or marker-only state.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.state_store import (
    MAGIC,
    MARKER_KEY,
    MARKER_MAGIC,
    MARKER_MAGIC_V1,
    decode_marker,
    decode_partition_state,
    encode_marker,
    encode_snapshot,
    marker_window_length,
    snapshot_dtype,
)
from daemon.windows import SymbolWindows
from model.data import load_series

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


# --------------------------------------------------------------------------- markers


@given(INT64)
def test_marker_round_trip(offset: int) -> None:
    key, value, headers = encode_marker(offset, 60)
    assert key == MARKER_KEY
    assert headers == []
    assert len(value) == 16 and value.startswith(MARKER_MAGIC)
    assert decode_marker(value) == offset
    assert marker_window_length(value) == 60


def test_a_marker_of_the_earlier_format_is_still_read() -> None:
    """TCM1 (the offset alone), what daemons before the window length was added wrote."""
    value = MARKER_MAGIC_V1 + (130).to_bytes(8, "little", signed=True)
    assert decode_marker(value) == 130
    assert marker_window_length(value) is None


@pytest.mark.parametrize("offset", [0, 1, 130, 2**63 - 1, -1])
def test_marker_round_trip_edges(offset: int) -> None:
    assert decode_marker(encode_marker(offset, 60)[1]) == offset


def test_marker_takes_numpy_integers() -> None:
    offset = np.int64(1_234_567_890_123)
    value = encode_marker(offset, 60)[1]  # type: ignore[arg-type]
    assert decode_marker(value) == 1_234_567_890_123
    assert type(decode_marker(value)) is int


def test_marker_is_little_endian() -> None:
    assert encode_marker(1, 60)[1] == MARKER_MAGIC + b"\x01" + b"\x00" * 7 + b"\x3c\x00\x00\x00"


def test_marker_beyond_int64_is_refused() -> None:
    with pytest.raises(OverflowError):
        encode_marker(2**63, 60)


def test_marker_key_is_no_symbol() -> None:
    # Symbols are printable; the marker key starts with NUL, so no symbol can collide.
    assert not MARKER_KEY.decode().isprintable()


@pytest.mark.parametrize(
    "value",
    [
        b"",
        MARKER_MAGIC,  # no offset
        MARKER_MAGIC + b"\x00" * 7,  # one byte short
        MARKER_MAGIC + b"\x00" * 9,  # one byte long
        b"TCM2" + b"\x00" * 8,  # another version
        b"tcm1" + b"\x00" * 8,  # magic is case-sensitive
        MAGIC + b"\x00" * 8,  # a snapshot's magic
        b"\x00" * 12,
        b"nonsense",
    ],
)
def test_malformed_marker_reads_as_none(value: bytes) -> None:
    assert decode_marker(value) is None


@given(st.binary(max_size=40))
def test_any_value_is_a_marker_or_none(value: bytes) -> None:
    decoded = decode_marker(value)
    if len(value) == 12 and value[:4] == MARKER_MAGIC:
        assert decoded == int.from_bytes(value[4:], "little", signed=True)
    else:
        assert decoded is None


# --------------------------------------------------------------------------- snapshots


def windows_on(partitions: dict[str, int], window_length: int = 20) -> SymbolWindows:
    """Each symbol gets 30 real prices (GOOG, shifted per symbol) on its own partition."""
    series = load_series("dataset:goog")[0]
    wins = SymbolWindows(window_length)
    for k, (symbol, partition) in enumerate(partitions.items()):
        rows = slice(k * 30, k * 30 + 30)
        slots = wins.slots_for([symbol] * 30, np.full(30, partition, np.int32))
        wins.apply(slots, series.prices[rows], series.ts[rows])
    return wins


def test_each_symbol_records_its_own_partitions_offset() -> None:
    wins = windows_on({"GOOG": 2, "QQQ": 5, "SPY": 2})
    records = encode_snapshot(wins.take_snapshot({2: 130, 5: 77}).snapshot)
    dtype = snapshot_dtype(20)
    offsets = {
        key.decode(): int(np.frombuffer(value, dtype)["offset"][0])
        for key, value, _ in records
        if key is not None
    }
    assert offsets == {"GOOG": 130, "QQQ": 77, "SPY": 130}
    assert all(len(value) == dtype.itemsize and value.startswith(MAGIC) for _, value, _ in records)


def test_partitions_decode_separately() -> None:
    wins = windows_on({"GOOG": 2, "QQQ": 5, "SPY": 2})
    records = encode_snapshot(wins.take_snapshot({2: 130, 5: 77}).snapshot)
    by_key = {key: value for key, value, _ in records if key is not None}
    part2 = {k: v for k, v in by_key.items() if k in (b"GOOG", b"SPY")}
    part2[MARKER_KEY] = encode_marker(130, 20)[1]
    state = decode_partition_state(part2, partition=2, window_length=20)
    assert sorted(state.snapshot.symbols) == ["GOOG", "SPY"]
    assert (state.snapshot.partitions == 2).all()
    assert state.snapshot.offsets.tolist() == [130, 130]
    assert state.marker == 130
    for i, symbol in enumerate(state.snapshot.symbols):
        np.testing.assert_array_equal(state.snapshot.prices[i], wins.window(symbol))
        assert state.snapshot.count[i] == 20
        assert state.snapshot.last_ts[i] == wins.last_ts[wins.slot_of(symbol)]


def test_non_ascii_symbols_survive_the_round_trip() -> None:
    symbol = "BRK.B-é€"
    wins = windows_on({symbol: 0})
    records = encode_snapshot(wins.take_snapshot({0: 9}).snapshot)
    latest = {key: value for key, value, _ in records if key is not None}
    assert list(latest) == [symbol.encode()]
    state = decode_partition_state(latest, partition=0, window_length=20)
    assert state.snapshot.symbols == [symbol]
    np.testing.assert_array_equal(state.snapshot.prices[0], wins.window(symbol))


def test_empty_state() -> None:
    state = decode_partition_state({}, partition=3, window_length=20)
    assert state.marker is None
    assert state.snapshot.symbols == []
    assert state.snapshot.prices.shape == (0, 20)
    assert len(state.snapshot.offsets) == 0


def test_marker_only_state() -> None:
    state = decode_partition_state({MARKER_KEY: encode_marker(42, 20)[1]}, 3, 20)
    assert state.marker == 42
    assert state.snapshot.symbols == []


def test_a_marker_under_a_symbol_key_is_no_snapshot() -> None:
    latest = {b"GOOG": encode_marker(42, 20)[1]}
    state = decode_partition_state(latest, partition=0, window_length=20)
    assert state.snapshot.symbols == [] and state.marker is None


def test_a_snapshot_under_the_marker_key_is_no_marker() -> None:
    wins = windows_on({"GOOG": 0})
    ((_, value, _),) = encode_snapshot(wins.take_snapshot({0: 9}).snapshot)
    state = decode_partition_state({MARKER_KEY: value}, partition=0, window_length=20)
    assert state.marker is None
    assert state.snapshot.symbols == []


def test_snapshots_that_cannot_be_loaded_are_counted() -> None:
    """Another window length (a checkpoint changed it) or a damaged value: the restore must
    not trust the partition's marker then, since it counts on those windows."""
    wins = windows_on({"GOOG": 0, "QQQ": 0})
    records = encode_snapshot(wins.take_snapshot({0: 9}).snapshot)
    latest = {key: value for key, value, _ in records if key is not None}
    latest[MARKER_KEY] = encode_marker(9, 20)[1]
    assert decode_partition_state(latest, partition=0, window_length=20).unusable == 0
    other_length = decode_partition_state(latest, partition=0, window_length=30)
    assert other_length.unusable == 2 and other_length.snapshot.symbols == []
    assert other_length.marker == 9  # read, but not to be trusted alone
    damaged = {**latest, b"QQQ": latest[b"QQQ"][:-3]}
    state = decode_partition_state(damaged, partition=0, window_length=20)
    assert state.unusable == 1 and state.snapshot.symbols == ["GOOG"]


def test_other_length_records_before_a_marker_of_this_length_are_ignored() -> None:
    """Written by a daemon of this window length, the marker does not count on records of
    another length written before it (their symbols never ticked for it): they no longer
    force a full replay on every restore. Written after it (a daemon of the other length
    killed between its records and its marker), or under a marker of the old length or of
    the earlier format, or with no offsets to order them by, they still do."""
    wins = windows_on({"GOOG": 0, "QQQ": 0})
    current = windows_on({"SPY": 0}, window_length=30)
    records = encode_snapshot(wins.take_snapshot({0: 9}).snapshot)
    old = {key: value for key, value, _ in records if key is not None}
    ((spy, spy_value, _),) = encode_snapshot(current.take_snapshot({0: 9}).snapshot)
    assert spy is not None
    before = {b"GOOG": 3, b"QQQ": 4, spy: 5, MARKER_KEY: 6}
    cases: list[tuple[bytes, dict[bytes, int] | None, int]] = [
        (encode_marker(9, 30)[1], before, 2),
        (encode_marker(9, 30)[1], {**before, b"QQQ": 7}, 1),
        (encode_marker(9, 30)[1], None, 0),
        (encode_marker(9, 20)[1], before, 0),
        (MARKER_MAGIC_V1 + (9).to_bytes(8, "little", signed=True), before, 0),
    ]
    for marker, written_at, stale in cases:
        latest = {**old, spy: spy_value, MARKER_KEY: marker}
        state = decode_partition_state(latest, 0, window_length=30, written_at=written_at)
        assert state.marker == 9 and state.snapshot.symbols == ["SPY"]
        assert (state.stale, state.unusable) == (stale, 2 - stale)


@pytest.mark.parametrize("window", [2**28, 2**31 - 1, 0, -5])
def test_a_snapshot_with_an_impossible_window_field_is_damaged_not_fatal(window: int) -> None:
    wins = windows_on({"GOOG": 0})
    ((_, value, _),) = encode_snapshot(wins.take_snapshot({0: 9}).snapshot)
    forged = value[:28] + window.to_bytes(4, "little", signed=True) + value[32:]
    latest = {b"GOOG": forged, MARKER_KEY: encode_marker(9, 30)[1]}
    state = decode_partition_state(latest, 0, window_length=30, written_at={b"GOOG": 1})
    assert (state.stale, state.unusable) == (0, 1)


def test_state_records_fold_into_the_latest_value_per_key_as_compaction_leaves_it() -> None:
    from types import SimpleNamespace

    from daemon.restore import fold_state_records

    def record(offset: int, key: bytes | None, value: bytes | None) -> SimpleNamespace:
        return SimpleNamespace(offset=offset, key=key, value=value)

    values: dict[bytes, bytes] = {}
    written_at: dict[bytes, int] = {}
    fold_state_records(
        [record(0, b"A", b"a0"), record(1, b"B", b"b0"), record(2, None, b"x")], values, written_at
    )
    fold_state_records(
        [record(3, b"A", b"a1"), record(4, b"B", None), record(5, b"C", b"c0")], values, written_at
    )
    assert values == {b"A": b"a1", b"C": b"c0"}  # B's tombstone deleted it
    assert written_at == {b"A": 3, b"C": 5}
