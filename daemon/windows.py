"""Per-symbol rolling price windows in preallocated arrays (pure, no I/O).

Each symbol owns one row ("slot") of a ``[capacity, window_length]`` float32 array holding
its last prices oldest -> newest; arrays grow in chunks, so a tick costs no Python object.

Prices are held as float32 (about 7 significant digits, a relative error below 6e-8): a
million symbols fit in ~250 MB. Every price is rounded once, when it arrives, so a window,
and the prediction made from it, do not depend on how ticks were split into fetches or
whether the window came back from a snapshot.
:meth:`SymbolWindows.apply` takes a whole fetch of ticks at once and, with array operations
only, drops ticks that are not newer than their symbol's last tick, rolls every window
forward, and returns the full window behind each accepted tick.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROWTH_CHUNK = 4096
NO_TS = np.iinfo(np.int64).min
PRICE_DTYPE = np.float32
_INT64_HALF = np.iinfo(np.int64).max // 2


@dataclass(frozen=True)
class AppliedTicks:
    """What :meth:`SymbolWindows.apply` did with a batch of ticks.

    ``accepted`` indexes the input ticks that moved a window, in input order; the other
    arrays are parallel to it. ``ready`` marks the accepted ticks whose window is full;
    ``windows`` holds exactly those windows, one row each, oldest price first.
    """

    accepted: np.ndarray  # int64 indices into the input
    slots: np.ndarray  # int64 slot of each accepted tick
    prev_ts: np.ndarray  # int64 ts of the symbol's previous tick (NO_TS if none)
    ready: np.ndarray  # bool, window full after this tick
    windows: np.ndarray  # [ready.sum(), window_length] float64 (float32-exact values)
    n_input: int

    @property
    def dropped(self) -> int:
        """Ticks in the input that were not newer than their symbol's last tick."""
        return self.n_input - len(self.accepted)


class SymbolWindows:
    """The last ``window_length`` prices of every symbol, plus bookkeeping per slot."""

    def __init__(self, window_length: int, initial_capacity: int = GROWTH_CHUNK) -> None:
        if not 2 <= window_length <= np.iinfo(np.int16).max:
            raise ValueError("window_length must be between 2 and 32767")
        self.window_length = window_length
        self._slots: dict[str, int] = {}
        self._symbol_of: list[str | None] = []  # slot -> symbol, for snapshots
        self._free: list[int] = []  # released slots (drop_partitions), reused first
        # Released while rows of batches still in flight may name them: reused only once
        # recycle_retired() says none is left, so no such row reaches another symbol.
        self._retired: list[int] = []
        self._used = 0  # slots [0, _used) have been handed out at least once
        self._capacity = 0
        self.prices = np.empty((0, window_length), PRICE_DTYPE)
        self.count = np.empty(0, np.int16)  # prices seen, saturating at window_length
        self.last_ts = np.empty(0, np.int64)
        self.partition = np.empty(0, np.int32)
        # The newest prediction per slot and the tick ts it was made for: when the next
        # tick arrives, its realised price scores that prediction (live accuracy).
        self.last_prediction = np.empty(0, np.float32)
        self.last_prediction_ts = np.empty(0, np.int64)
        # Slots changed since the last snapshot was taken (see take_snapshot).
        self.dirty = np.empty(0, bool)
        # Per slot, the input offset from which replaying its partition over the symbol's
        # last snapshot (or over nothing, if it has none) rebuilds its window: a
        # snapshot's marker may not pass it while the symbol is dirty.
        self.replay_from = np.empty(0, np.int64)
        self._grow(max(initial_capacity, 1))

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._slots

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def nbytes(self) -> int:
        arrays = (self.prices, self.count, self.last_ts, self.partition)
        extra = (self.last_prediction, self.last_prediction_ts)
        return sum(a.nbytes for a in arrays + extra)

    def _grow(self, new_capacity: int) -> None:
        # Spare rows of the big arrays stay untouched (np.empty), so they cost address
        # space, not RSS, until a symbol takes them (slots_for initialises new slots).
        # partition and dirty, which whole-array scans read, are filled: -1 / False.
        def grown(array: np.ndarray, fill: int | None = None) -> np.ndarray:
            shape = (new_capacity, *array.shape[1:])
            out = (
                np.empty(shape, array.dtype) if fill is None else np.full(shape, fill, array.dtype)
            )
            out[: len(array)] = array
            return out

        self.prices = grown(self.prices)
        self.count = grown(self.count)
        self.last_ts = grown(self.last_ts)
        self.partition = grown(self.partition, -1)
        self.last_prediction = grown(self.last_prediction)
        self.last_prediction_ts = grown(self.last_prediction_ts)
        self.dirty = grown(self.dirty, False)
        self.replay_from = grown(self.replay_from)
        self._symbol_of.extend([None] * (new_capacity - self._capacity))
        self._capacity = new_capacity

    def _new_slot(self) -> int:
        if self._free:
            return self._free.pop()
        if self._used == self._capacity:
            self._grow(self._capacity + max(GROWTH_CHUNK, self._capacity // 4))
        self._used += 1
        return self._used - 1

    def slot_of(self, symbol: str) -> int | None:
        return self._slots.get(symbol)

    def mark_unsaved(self, snapshot: WindowSnapshot, replay_from: np.ndarray) -> None:
        """This snapshot was never written: its symbols are dirty again and replay, as
        before it was taken, from ``replay_from`` (their values then)."""
        found = [
            (i, slot)
            for i, slot in enumerate(map(self._slots.get, snapshot.symbols))
            if slot is not None and self.partition[slot] == snapshot.partitions[i]
        ]
        if found:
            rows, slots = (np.asarray(x, np.int64) for x in zip(*found, strict=True))
            self.dirty[slots] = True
            self.replay_from[slots] = np.minimum(self.replay_from[slots], replay_from[rows])

    def window(self, symbol: str) -> np.ndarray | None:
        """A copy of the symbol's stored prices, oldest first (fewer when not yet full)."""
        slot = self._slots.get(symbol)
        if slot is None:
            return None
        n = min(int(self.count[slot]), self.window_length)
        return self.prices[slot, self.window_length - n :].copy()

    def slots_for(
        self, symbols: list[str], partitions: np.ndarray, offsets: np.ndarray | None = None
    ) -> np.ndarray:
        """Slot per symbol, allocating new ones (recording the input partition, and the
        input offset of the symbol's first tick: where a replay must start to see it;
        without ``offsets``, 0)."""
        slots = np.empty(len(symbols), np.int64)
        lookup = self._slots
        # Marks symbols seen for the first time (a bytearray, not a list of ints: a million
        # short-lived ints between the long-lived ones would fragment the heap).
        fresh = bytearray(len(symbols))
        for i, symbol in enumerate(symbols):
            slot = lookup.get(symbol)
            if slot is None:
                slot = self._new_slot()
                lookup[symbol] = slot
                self._symbol_of[slot] = symbol
                fresh[i] = 1
            slots[i] = slot
        new = np.frombuffer(fresh, np.uint8).astype(bool)
        if new.any():
            new_slots = slots[new]
            self._reset(new_slots)
            self.partition[new_slots] = partitions[new]
            self.replay_from[new_slots] = 0 if offsets is None else offsets[new]
        return slots

    def drop_partitions(self, partitions: set[int]) -> int:
        """Forget every symbol read from these input partitions (on revocation)."""
        if not partitions:
            return 0
        doomed = [s for s, slot in self._slots.items() if int(self.partition[slot]) in partitions]
        for symbol in doomed:
            slot = self._slots.pop(symbol)
            self._symbol_of[slot] = None
            self._reset(slot)
            self._retired.append(slot)
        return len(doomed)

    def recycle_retired(self) -> None:
        """Make the slots drop_partitions released reusable; call only when no row of a
        batch fetched before then is still in flight (it would write to them)."""
        for slot in self._retired:
            self._reset(slot)
        self._free.extend(self._retired)
        self._retired.clear()

    def _reset(self, slot: int | np.ndarray) -> None:
        self.prices[slot] = np.nan
        self.count[slot] = 0
        self.last_ts[slot] = NO_TS
        self.partition[slot] = -1
        self.last_prediction[slot] = np.nan
        self.last_prediction_ts[slot] = NO_TS
        self.dirty[slot] = False

    def apply(self, slots: np.ndarray, prices: np.ndarray, ts: np.ndarray) -> AppliedTicks:
        """Roll windows forward by a batch of ticks given in consumption order.

        A tick is accepted only if its ts is after every earlier tick of its symbol (stored
        or earlier in this batch), so a redelivered or out-of-order tick never corrupts a
        window. Vectorised: ticks are grouped by slot with a stable sort, and each window is
        a slice of ``[stored window, new prices]`` for its group.
        """
        n = len(slots)
        w = self.window_length
        if n == 0:
            return _nothing_applied(w, n_input=0)

        order = np.argsort(slots, kind="stable")  # grouped by slot, time order within
        sorted_slots = slots[order]
        first = group_starts(sorted_slots)
        accepted_sorted = self._newer_than_before(sorted_slots, ts[order], first)
        if accepted_sorted is None:  # every tick is newer: the usual case
            acc_order, acc_slots, acc_first = order, sorted_slots, first
        else:
            # Dropping ticks keeps the rest grouped by slot and in time order.
            acc_order = order[accepted_sorted]
            if len(acc_order) == 0:
                return _nothing_applied(w, n_input=n)
            acc_slots = sorted_slots[accepted_sorted]
            acc_first = group_starts(acc_slots)
        m = len(acc_order)
        group_start = np.flatnonzero(acc_first)
        group_slots = acc_slots[group_start]
        group_size = np.empty(len(group_start), np.int64)
        np.subtract(group_start[1:], group_start[:-1], out=group_size[:-1])
        group_size[-1] = m - group_start[-1]
        acc_group = np.cumsum(acc_first) - 1
        rank = np.arange(m) - group_start[acc_group]

        # ext holds, per group, the stored window followed by the new prices.
        g = len(group_slots)
        seg_start = np.arange(g) * w + group_start  # where each group's segment begins
        ext = np.empty(g * w + m, np.float64)
        # Row views of length w over ext (row i = ext[i:i+w]): gathering or scattering whole
        # rows through them copies w values per row without a [rows, w] index array.
        rows_of_ext = np.ndarray(
            (len(ext) - w + 1, w), np.float64, buffer=ext, strides=(ext.itemsize, ext.itemsize)
        )
        rows_of_ext[seg_start] = self.prices[group_slots]
        new_pos = seg_start[acc_group] + w + rank
        ext[new_pos] = prices[acc_order].astype(PRICE_DTYPE)  # rounded as it will be stored

        count = self.count[group_slots]
        full = count[acc_group] + rank + 1 >= w

        # Previous tick's ts for each accepted tick (stored last ts for a group's first).
        acc_ts = ts[acc_order]
        prev_ts = np.empty(m, np.int64)
        prev_ts[1:] = acc_ts[:-1]
        prev_ts[group_start] = self.last_ts[group_slots]

        # Write back: each group's last w values become its stored window.
        last_pos = seg_start + w + group_size  # one past each group's last price
        self.prices[group_slots] = rows_of_ext[last_pos - w]
        self.count[group_slots] = np.minimum(count + group_size, w)
        self.last_ts[group_slots] = acc_ts[group_start + group_size - 1]
        self.dirty[group_slots] = True

        # Report in input order: map the grouped arrays back through acc_order, and gather
        # each ready tick's window (the w prices ending at its own) in that order.
        back = np.argsort(acc_order, kind="stable")
        ready = full[back]
        window_ends = new_pos[back][ready]
        return AppliedTicks(
            accepted=acc_order[back],
            slots=acc_slots[back],
            prev_ts=prev_ts[back],
            ready=ready,
            windows=rows_of_ext[window_ends - w + 1],
            n_input=n,
        )

    def _newer_than_before(
        self, sorted_slots: np.ndarray, sorted_ts: np.ndarray, first: np.ndarray
    ) -> np.ndarray | None:
        """Which ticks (grouped by slot, time order within) are newer than every earlier
        tick of their symbol, stored or in this batch; None when all of them are."""
        stored = self.last_ts[sorted_slots[first]]
        # Cheap check first: each tick newer than the one before it in its group, and each
        # group's first newer than the stored ts. When that holds, every tick is accepted.
        rising = np.empty(len(sorted_ts), bool)
        np.greater(sorted_ts[1:], sorted_ts[:-1], out=rising[1:])
        rising[first] = sorted_ts[first] > stored
        if rising.all():
            return None
        # Otherwise compare each tick with the running max of ts in its group (a tick after
        # a dropped one must still beat the newest accepted one). Groups are made disjoint
        # in value by an offset, so one cumulative max over all of them serves every group.
        group_of = np.cumsum(first) - 1
        n, n_groups = len(sorted_ts), len(stored)
        base = int(sorted_ts.min())
        known = stored != NO_TS
        if known.any():
            base = min(base, int(stored[known].min()))
        rel_ts = sorted_ts - base
        rel_prior = np.where(known, stored - base, -1)
        span = int(max(rel_ts.max(), rel_prior.max())) + 2
        if span * n_groups >= _INT64_HALF:
            raise OverflowError("tick timestamps span too wide a range for one batch")
        offset = np.arange(n_groups, dtype=np.int64) * span
        keys = np.empty(n + n_groups, np.int64)
        tick_pos = np.arange(n) + group_of + 1
        keys[np.flatnonzero(first) + np.arange(n_groups)] = rel_prior + offset
        keys[tick_pos] = rel_ts + offset[group_of]
        running = np.maximum.accumulate(keys)
        accepted: np.ndarray = keys[tick_pos] > running[tick_pos - 1]
        return accepted

    def take_snapshot(
        self, positions: dict[int, int], max_symbols: int | None = None
    ) -> SnapshotRound:
        """Copy the state of changed symbols of ``positions``' partitions (whose windows
        reflect the input below ``positions[partition]``) and mark them clean.

        At most ``max_symbols`` at a time, those furthest behind their partition's position
        first: a round's copy stays bounded however many symbols changed, and every
        partition's marker advances round by round.
        """
        # Full-length temporaries here are bool masks: with a million changed symbols, a
        # few int64 index arrays over all of them would outweigh the round's own copy.
        unsaved = self.dirty & np.isin(self.partition, list(positions))
        n_unsaved = int(np.count_nonzero(unsaved))
        if max_symbols is None or n_unsaved <= max_symbols:
            slots = np.flatnonzero(unsaved)
        else:
            slots = self._furthest_behind(unsaved, positions, max_symbols)
        unsaved[slots] = False  # now: the changed symbols left for later rounds
        # The oldest offset a still-unsaved symbol needs replayed from bounds each marker.
        markers = dict(positions)
        if n_unsaved > len(slots):
            for p, position in positions.items():
                in_p = unsaved & (self.partition == p)
                markers[p] = int(np.min(self.replay_from, where=in_p, initial=position))
        previous = self.replay_from[slots].copy()
        partitions = self.partition[slots].copy()
        offsets = np.zeros(len(slots), np.int64)
        for p, position in positions.items():
            offsets[partitions == p] = position
        self.replay_from[slots] = offsets
        self.dirty[slots] = False
        snapshot = WindowSnapshot(
            symbols=[s for s in (self._symbol_of[i] for i in slots.tolist()) if s is not None],
            partitions=partitions,
            prices=self.prices[slots].copy(),
            count=self.count[slots].astype(np.int64),
            last_ts=self.last_ts[slots].copy(),
            offsets=offsets,
        )
        return SnapshotRound(snapshot, markers, previous, unsaved=n_unsaved - len(slots))

    def _furthest_behind(
        self, unsaved: np.ndarray, positions: dict[int, int], n: int
    ) -> np.ndarray:
        """The ``n`` unsaved slots whose replay_from is furthest behind their partition's
        position (offsets of different partitions do not compare), in slot order."""
        behind = self.replay_from[unsaved]  # made "minus the position" per partition below
        partition = self.partition[unsaved]
        for p, position in positions.items():
            behind[partition == p] -= position
        del partition
        behind.partition(n - 1)
        cut = behind[n - 1]  # the n-th most negative: those below it go, then ties
        del behind
        below = np.zeros(len(unsaved), bool)
        tie = np.zeros(len(unsaved), bool)
        for p, position in positions.items():
            in_p = unsaved & (self.partition == p)
            below |= in_p & (self.replay_from < cut + position)
            tie |= in_p & (self.replay_from == cut + position)
        first = np.flatnonzero(below)
        return np.sort(np.r_[first, np.flatnonzero(tie)[: n - len(first)]])

    def load(self, snapshot: WindowSnapshot) -> None:
        """Install symbols' saved state (restore); they count as clean."""
        if snapshot.prices.shape[1:] != (self.window_length,):
            raise ValueError(
                f"snapshot windows of length {snapshot.prices.shape[1:]} do not fit "
                f"window_length {self.window_length}"
            )
        slots = self.slots_for(snapshot.symbols, snapshot.partitions)
        self.prices[slots] = snapshot.prices
        self.count[slots] = np.minimum(snapshot.count, self.window_length)
        self.last_ts[slots] = snapshot.last_ts
        self.dirty[slots] = False
        self.replay_from[slots] = snapshot.offsets


def group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """True where a run of equal values in a sorted array begins."""
    starts = np.empty(len(sorted_keys), bool)
    if len(starts):
        starts[0] = True
        np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=starts[1:])
    return starts


def _nothing_applied(window_length: int, n_input: int) -> AppliedTicks:
    empty = np.empty(0, np.int64)
    windows = np.empty((0, window_length))
    return AppliedTicks(empty, empty, empty, np.empty(0, bool), windows, n_input=n_input)


@dataclass(frozen=True)
class WindowSnapshot:
    """Saved state of some symbols: enough to resume their windows exactly."""

    symbols: list[str]
    partitions: np.ndarray  # int32, input partition of each symbol
    prices: np.ndarray  # [n, window_length] float32 (as stored)
    count: np.ndarray  # int64
    last_ts: np.ndarray  # int64
    offsets: np.ndarray  # int64, input offset each symbol's state reflects (all below it)

    def __len__(self) -> int:
        return len(self.symbols)

    def rows(self, start: int, stop: int) -> WindowSnapshot:
        """Symbols ``start:stop`` of this snapshot (views, no copy)."""
        return WindowSnapshot(
            symbols=self.symbols[start:stop],
            partitions=self.partitions[start:stop],
            prices=self.prices[start:stop],
            count=self.count[start:stop],
            last_ts=self.last_ts[start:stop],
            offsets=self.offsets[start:stop],
        )


@dataclass(frozen=True)
class SnapshotRound:
    """One :meth:`SymbolWindows.take_snapshot`: the symbols it saves and, per partition,
    the marker to write once they (and every earlier round) are on the state topic."""

    snapshot: WindowSnapshot
    # Replaying partition p from markers[p] over the saved snapshots rebuilds every window.
    markers: dict[int, int]
    previous: np.ndarray  # the symbols' replay_from before: restored if never written
    unsaved: int  # changed symbols left for later rounds
