"""The prediction record the daemon writes per row: the contract's fields and headers."""

from __future__ import annotations

import math
import time

import numpy as np
import orjson
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from daemon.pipeline import ScoringRows
from daemon.records import prediction_records
from daemon.ticks import json_numbers


def rows_of(symbols: list[str], prices: np.ndarray, partitions: list[int]) -> ScoringRows:
    n = len(symbols)
    return ScoringRows(
        windows=np.zeros((n, 60)),
        symbols=np.array(symbols, dtype=object),
        prices=prices,
        ts=np.arange(n, dtype=np.int64) + 1_704_205_800_000,
        prev_ts=np.zeros(n, np.int64),
        slots=np.arange(n),
        partitions=np.array(partitions, np.int32),
        offsets=np.arange(n, dtype=np.int64) + 41,
        consumed_at=np.zeros(n),
    )


def test_each_record_carries_the_contract_fields_and_provenance() -> None:
    symbols = ["QQQ", 'odd "name" \\ é', "BTC-USD"]
    prices = np.array([312.45, 0.1 + 0.2, 1e-7])
    predicted = np.array([313.0, float("nan"), 2.5e22])
    rows = rows_of(symbols, prices, [2, 0, 2])

    before_ms = int(time.time() * 1000)
    records = prediction_records(rows, predicted, "v7")
    after_ms = int(time.time() * 1000)

    assert [key for key, _, _ in records] == [s.encode() for s in symbols]
    for i, (_, value, headers) in enumerate(records):
        doc = orjson.loads(value)
        assert doc["symbol"] == symbols[i]
        assert doc["ts"] == 1_704_205_800_000 + i
        assert doc["price"] == prices[i]  # round-trips exactly
        expected = predicted[i]
        assert doc["predicted"] == expected if math.isfinite(expected) else doc["predicted"] is None
        assert doc["model_version"] == "v7"
        assert isinstance(doc["produced_at"], int)
        assert before_ms <= doc["produced_at"] <= after_ms  # wall-clock ms of the call
        assert dict(headers) == {
            "model_version": b"v7",
            "input_partition": str(rows.partitions[i]).encode(),
            "input_offset": str(41 + i).encode(),
        }


finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=64)


@given(arrays(np.float64, st.integers(0, 50), elements=finite_or_not))
def test_json_numbers_match_orjson_one_by_one(values: np.ndarray) -> None:
    assert json_numbers(values) == [orjson.dumps(v) for v in values.tolist()]


def test_json_numbers_take_strided_views() -> None:
    values = np.arange(10, dtype=np.float64) / 3
    assert json_numbers(values[::2]) == [orjson.dumps(v) for v in values[::2].tolist()]
