"""The bench's prediction reader counts each (symbol, ts) pair once (no broker needed)."""

from __future__ import annotations

import numpy as np

from daemon.bench import PredictionReader


def test_distinct_counts_a_redelivered_prediction_once() -> None:
    reader = PredictionReader("unused:9092", "unused")
    assert reader.distinct() == 0
    # Two fetches; the second redelivers (b"B", 2) and brings keys of another width.
    reader.keys = [np.array([b"A", b"B"], np.bytes_), np.array([b"B", b"CC", b"A"], np.bytes_)]
    reader.ts = [np.array([1, 2]), np.array([2, 2, 3])]
    reader.received = [np.zeros(2), np.zeros(3)]
    assert reader.distinct() == 4  # (A,1) (B,2) (CC,2) (A,3)


def test_first_produced_at_is_the_earliest_record_timestamp() -> None:
    reader = PredictionReader("unused:9092", "unused")
    assert reader.first_produced_at() is None
    # Partitions interleave: the earliest record need not come first.
    reader.produced_ms = [
        np.array([1_700_000_000_500, 1_700_000_000_900]),
        np.array([1_700_000_000_200]),
    ]
    assert reader.first_produced_at() == 1_700_000_000.2
