"""Data that flows through the daemon's pipeline: fetched chunks, scored batches."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from aiokafka.structs import TopicPartition

from daemon.publisher import Delivery
from daemon.state_store import PendingSnapshot
from daemon.ticks import BadTick


@dataclass
class ScoringRows:
    """Full windows waiting to be scored, with what each prediction must carry."""

    windows: np.ndarray  # [n, window_length] float64, oldest first
    symbols: np.ndarray  # [n] object (str)
    prices: np.ndarray  # [n] float64, the newest price of each window
    ts: np.ndarray  # [n] int64, event time of the newest tick
    prev_ts: np.ndarray  # [n] int64, event time of the symbol's previous tick
    slots: np.ndarray  # [n] int64, the symbol's slot in SymbolWindows
    partitions: np.ndarray  # [n] int32, input partition
    offsets: np.ndarray  # [n] int64, input offset
    consumed_at: np.ndarray  # [n] float64, time.time() when fetched

    def __len__(self) -> int:
        return len(self.ts)

    def take(self, start: int, stop: int) -> ScoringRows:
        return ScoringRows(**{name: getattr(self, name)[start:stop] for name in _FIELDS})

    @staticmethod
    def concat(parts: list[ScoringRows]) -> ScoringRows:
        if len(parts) == 1:
            return parts[0]
        return ScoringRows(
            **{name: np.concatenate([getattr(p, name) for p in parts]) for name in _FIELDS}
        )

    @staticmethod
    def empty(window_length: int) -> ScoringRows:
        return ScoringRows(
            windows=np.empty((0, window_length)),
            symbols=np.empty(0, object),
            prices=np.empty(0),
            ts=np.empty(0, np.int64),
            prev_ts=np.empty(0, np.int64),
            slots=np.empty(0, np.int64),
            partitions=np.empty(0, np.int32),
            offsets=np.empty(0, np.int64),
            consumed_at=np.empty(0),
        )


_FIELDS = tuple(ScoringRows.__dataclass_fields__)


@dataclass
class Chunk:
    """Everything one fetch produced; committed only once all of it is acknowledged."""

    rows: ScoringRows
    bad: list[BadTick]
    commit: dict[TopicPartition, int]  # next offset to commit, per input partition
    # Window state as of the end of this chunk, written once the chunk is committed.
    snapshot: PendingSnapshot | None = None
    # The daemon's rebalance count when it was fetched: exactly-once never commits the
    # offsets of an earlier assignment, even of partitions assigned here again.
    assignment: int = 0


@dataclass
class Dispatched:
    """A scored batch handed to the producer, plus the chunks it completes."""

    deliveries: list[Delivery]
    rows: ScoringRows
    completed: list[Chunk] = field(default_factory=list)


def commit_offsets(chunks: list[Chunk]) -> dict[TopicPartition, int]:
    """The offsets to commit once ``chunks`` (in fetch order) are all acknowledged."""
    offsets: dict[TopicPartition, int] = {}
    for chunk in chunks:
        offsets.update(chunk.commit)  # later chunks hold later offsets
    return offsets
