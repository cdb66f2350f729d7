"""SymbolWindows against a plain per-tick reference implementation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from daemon.settings import MAX_FETCH_RECORDS, Settings
from daemon.windows import NO_TS, SymbolWindows
from model.data import load_series
from model.tick_rules import MAX_TS_MS


class ReferenceWindows:
    """The obvious per-tick loop the vectorised code must agree with."""

    def __init__(self, w: int) -> None:
        self.w = w
        self.hist: dict[str, list[float]] = {}
        self.last: dict[str, int] = {}

    def tick(self, symbol: str, price: float, ts: int) -> tuple[bool, np.ndarray | None, int]:
        prev = self.last.get(symbol, NO_TS)
        if ts <= prev:
            return False, None, prev
        self.last[symbol] = ts
        h = self.hist.setdefault(symbol, [])
        h.append(float(np.float32(price)))  # windows hold prices as float32
        window = np.array(h[-self.w :]) if len(h) >= self.w else None
        return True, window, prev


def run_both(w: int, batches: list[list[tuple[str, float, int]]]) -> None:
    fast = SymbolWindows(w, initial_capacity=2)
    ref = ReferenceWindows(w)
    for batch in batches:
        symbols = [b[0] for b in batch]
        prices = np.array([b[1] for b in batch], np.float64)
        ts = np.array([b[2] for b in batch], np.int64)
        slots = fast.slots_for(symbols, np.zeros(len(batch), np.int32))
        applied = fast.apply(slots, prices, ts)
        expected = [ref.tick(*b) for b in batch]
        exp_accepted = [i for i, e in enumerate(expected) if e[0]]
        assert applied.accepted.tolist() == exp_accepted
        assert applied.dropped == len(batch) - len(exp_accepted)
        assert applied.prev_ts.tolist() == [expected[i][2] for i in exp_accepted]
        exp_windows = [win for i in exp_accepted if (win := expected[i][1]) is not None]
        assert applied.ready.sum() == len(exp_windows)
        if exp_windows:
            np.testing.assert_array_equal(applied.windows, np.stack(exp_windows))
        for i, idx in enumerate(applied.accepted):
            assert applied.slots[i] == fast.slot_of(symbols[idx])


# Synthetic on purpose: any positive float, not only real price levels, must come out as
# the reference computes it (float32 rounding included), in any tick order.
tick = st.tuples(
    st.sampled_from(["A", "B", "C", "D", "E"]),
    st.floats(min_value=0.01, max_value=1e6, allow_nan=False),
    st.integers(min_value=1, max_value=40),
)


@settings(max_examples=200, deadline=None)
@given(w=st.integers(2, 6), batches=st.lists(st.lists(tick, max_size=30), max_size=6))
def test_matches_reference_including_out_of_order_and_duplicates(w, batches):
    run_both(w, batches)


def test_window_is_oldest_first_and_rolls():
    wins = SymbolWindows(3)
    slots = wins.slots_for(["X"] * 5, np.zeros(5, np.int32))
    # Synthetic prices 1..5, so that the expected windows can be written out by hand.
    applied = wins.apply(slots, np.arange(1.0, 6.0), np.arange(1, 6))
    np.testing.assert_array_equal(applied.windows, [[1, 2, 3], [2, 3, 4], [3, 4, 5]])
    np.testing.assert_array_equal(wins.window("X"), [3, 4, 5])


def test_redelivered_ticks_are_dropped_and_window_unchanged():
    wins = SymbolWindows(3)
    s = wins.slots_for(["X"] * 4, np.zeros(4, np.int32))
    # Synthetic prices 1..4, so that a redelivered tick's effect would show by hand.
    wins.apply(s, np.array([1.0, 2, 3, 4]), np.array([10, 20, 30, 40]))
    again = wins.apply(s[:2], np.array([3.0, 4]), np.array([30, 40]))
    assert again.dropped == 2
    assert len(again.windows) == 0
    np.testing.assert_array_equal(wins.window("X"), [2, 3, 4])


def test_grows_past_capacity_and_drops_partitions():
    wins = SymbolWindows(2, initial_capacity=1)
    symbols = [f"S{i}" for i in range(10_000)]
    parts = np.arange(10_000, dtype=np.int32) % 3
    slots = wins.slots_for(symbols, parts)
    wins.apply(slots, np.ones(10_000), np.ones(10_000, np.int64))  # prices irrelevant here
    assert len(wins) == 10_000 and wins.capacity >= 10_000
    removed = wins.drop_partitions({1})
    assert removed == sum(1 for p in parts if p == 1)
    assert "S1" not in wins and "S0" in wins
    wins.recycle_retired()  # nothing in flight names them any more
    # Freed slots are reused and start empty.
    new = wins.slots_for(["NEW"], np.array([1], np.int32))
    fresh = wins.window("NEW")
    assert fresh is not None
    assert len(fresh) == 0
    assert int(new[0]) < wins.capacity


def test_a_released_slot_waits_for_recycling_before_another_symbol_gets_it():
    """A batch in flight when its partition was revoked still writes its prediction to
    the old symbol's slot; a symbol that took that slot at once would then be scored
    against the other symbol's prediction."""
    wins = SymbolWindows(2)
    [old] = wins.slots_for(["OLD"], np.array([0], np.int32)).tolist()
    wins.drop_partitions({0})
    [new] = wins.slots_for(["NEW"], np.array([1], np.int32)).tolist()
    assert new != old, "reused while rows naming it may be in flight"
    wins.last_prediction[old] = 300.0  # the in-flight batch publishes
    wins.last_prediction_ts[old] = 7
    wins.recycle_retired()  # the pipeline drained
    [later] = wins.slots_for(["LATER"], np.array([1], np.int32)).tolist()
    assert later == old
    fresh = wins.window("LATER")
    assert fresh is not None and len(fresh) == 0
    assert np.isnan(wins.last_prediction[later])


def test_spare_capacity_never_leaks_into_snapshots():
    """Grown rows are left uninitialised until a symbol takes them: whole-array scans
    (snapshots, 'everything is dirty') must still see only live symbols."""
    wins = SymbolWindows(3, initial_capacity=1)
    symbols = [f"S{i}" for i in range(5000)]
    slots = wins.slots_for(symbols, np.arange(5000, dtype=np.int32) % 2)
    assert wins.capacity > 5000  # some rows were never handed out
    # Filler prices: only which rows a snapshot reads is under test, not their values.
    wins.apply(slots, np.linspace(1.0, 2.0, 5000), np.full(5000, 7, np.int64))
    wins.take_snapshot({0: 1, 1: 1})  # clean
    wins.dirty[:] = True  # every window changed
    snapshot = wins.take_snapshot({0: 2, 1: 2}).snapshot
    assert sorted(snapshot.symbols) == sorted(symbols)
    assert len(snapshot.prices) == len(snapshot.symbols) == 5000
    assert (snapshot.count == 1).all() and (snapshot.last_ts == 7).all()
    assert np.isnan(snapshot.prices[:, :2]).all()  # not yet seen: empty, not garbage
    # A new symbol in a grown row starts empty too.
    wins.slots_for(["LATE"], np.array([0], np.int32))
    late = wins.window("LATE")
    assert late is not None and len(late) == 0


def test_prices_are_held_as_float32_and_counts_saturate():
    wins = SymbolWindows(4)
    slots = wins.slots_for(["X"] * 10, np.zeros(10, np.int32))
    prices = load_series("dataset:nasdaq")[0].prices[-10:]  # real closes, 6 decimals
    applied = wins.apply(slots, prices, np.arange(1, 11, dtype=np.int64))
    assert wins.prices.dtype == np.float32
    # The scored windows carry exactly the stored (float32-rounded) prices...
    np.testing.assert_array_equal(applied.windows[-1], prices[-4:].astype(np.float32))
    assert (applied.windows[-1] != prices[-4:]).any()  # ...which float32 did round
    # Round to nearest: off by at most half a float32 step (2**-24 of the price).
    assert (np.abs(applied.windows[-1] - prices[-4:]) <= prices[-4:] * 2**-24).all()
    assert int(wins.count[slots[0]]) == 4  # saturates at the window length


def ticked(symbols: list[str], first_offsets: list[int], partition: int = 0) -> SymbolWindows:
    """One real GOOG price per symbol, each first seen at its given input offset."""
    prices = load_series("dataset:goog")[0].prices[: len(symbols)]
    wins = SymbolWindows(4)
    offsets = np.asarray(first_offsets, np.int64)
    slots = wins.slots_for(symbols, np.full(len(symbols), partition, np.int32), offsets)
    wins.apply(slots, prices, np.full(len(symbols), 1, np.int64))
    return wins


def test_a_new_symbol_replays_from_its_first_ticks_offset():
    wins = ticked(["A", "B", "A"], [3, 4, 5])  # A's second tick is not its first
    assert [wins.replay_from[wins.slot_of(s)] for s in ("A", "B")] == [3, 4]


def test_a_bounded_round_saves_the_longest_unsaved_and_holds_its_marker_back():
    wins = ticked(["A", "B", "C", "D"], [7, 2, 9, 5], partition=1)
    first = wins.take_snapshot({1: 10}, max_symbols=2)
    assert sorted(first.snapshot.symbols) == ["B", "D"]  # unsaved since offsets 2 and 5
    assert first.snapshot.offsets.tolist() == [10, 10]
    assert first.markers == {1: 7}  # A still needs the input from its first tick, 7
    assert first.unsaved == 2
    second = wins.take_snapshot({1: 12}, max_symbols=2)
    assert sorted(second.snapshot.symbols) == ["A", "C"]
    assert second.markers == {1: 12} and second.unsaved == 0
    assert wins.take_snapshot({1: 13}, max_symbols=2).snapshot.symbols == []


def test_a_round_never_written_leaves_its_symbols_replaying_from_before_it():
    wins = ticked(["A", "B"], [3, 5])
    lost = wins.take_snapshot({0: 10}, max_symbols=2)  # both saved ... then given up
    wins.mark_unsaved(lost.snapshot, lost.previous)
    assert all(wins.dirty[wins.slots_for(["A", "B"], np.zeros(2, np.int32))])
    again = wins.take_snapshot({0: 12}, max_symbols=1)
    assert again.snapshot.symbols == ["A"]
    assert again.markers == {0: 5}  # B's snapshot never landed: replay from its first tick


def test_the_largest_allowed_fetch_of_distinct_symbols_with_a_late_tick_is_applied():
    # The order check packs every symbol of a fetch into one int64 range as wide as the
    # fetch's ts span; at the fetch cap, with the widest valid span and one late tick
    # (which takes that path), it must still fit.
    n = MAX_FETCH_RECORDS
    wins = SymbolWindows(2)
    symbols = [f"S{i}" for i in range(n - 1)] + ["S0"]
    slots = wins.slots_for(symbols, np.zeros(n, np.int32))
    ts = np.full(n, MAX_TS_MS // 2, np.int64)
    ts[0], ts[1], ts[-1] = MAX_TS_MS - 1, 1, 2  # S0 newest first, then late
    applied = wins.apply(slots, np.ones(n), ts)  # prices irrelevant here
    assert applied.dropped == 1
    with pytest.raises(ValidationError, match="fetch_max_records"):
        Settings(fetch_max_records=MAX_FETCH_RECORDS + 1)
