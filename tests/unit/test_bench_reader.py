"""The bench's prediction reader counts each (symbol, ts) pair once (no broker needed)."""

from __future__ import annotations

import argparse

import numpy as np
import orjson
import pytest

from daemon.bench.load import PredictionReader, TickSource, TickWriter, _prediction_ts
from daemon.bench.phases import next_commit_poll_s
from daemon.bench.run import add_bench_arguments
from daemon.ticks import encode_tick


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


def test_commit_polls_are_sparse_far_from_the_end_and_dense_near_it() -> None:
    # No progress seen yet, or none since the first: no rate, so poll densely.
    assert next_commit_poll_s(None, 10.0, 0, 1000, fine=0.01, coarse=0.25) == 0.01
    assert next_commit_poll_s((5.0, 500), 6.0, 500, 1000, fine=0.01, coarse=0.25) == 0.01
    # 100 commits/s since t=0, 900 left: 9 s to go, so the coarse period.
    assert next_commit_poll_s((0.0, 0), 1.0, 100, 1000, fine=0.01, coarse=0.25) == 0.25
    # 10 left at 100/s: half of the 0.1 s still to go.
    assert next_commit_poll_s((0.0, 0), 9.9, 990, 1000, fine=0.01, coarse=0.25) == 0.05
    # 1 left: never below the fine period.
    assert next_commit_poll_s((0.0, 0), 9.99, 999, 1000, fine=0.01, coarse=0.25) == 0.01


def test_the_load_generator_writes_canonical_tick_json() -> None:
    prices = np.array([[312.45, 0.1 + 0.2, 1e-7], [5e22, 1.0, 2.5]])
    source = TickSource.of(["QQQ.0", 'odd "one".1'], prices, note="")
    writer = TickWriter.__new__(TickWriter)  # no producer needed for _records
    writer.source, writer.next_tick, writer.last_step_ts = source, 0, 0
    records = writer._records(6)
    for k, (key, value, headers) in enumerate(records):
        name, price = source.names[k % 2], source.prices[k % 2, k // 2]
        tick = orjson.loads(value)
        assert key == name.encode() and headers == []
        assert value == encode_tick(name, float(price), tick["ts"])
    ts = [orjson.loads(v)["ts"] for _, v, _ in records]
    assert ts[2] > ts[0] and ts[3] > ts[1]  # each symbol's ts grows


def test_the_reader_takes_ts_from_the_prediction_json() -> None:
    class Record:
        value = b'{"symbol":"Q","ts":1704205800000,"price":1.5,"predicted":2.0,"x":[1]}'

    assert _prediction_ts(Record()) == 1_704_205_800_000


def test_c_drains_must_be_at_least_one(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    assert parser.parse_args(["--c-drains", "5"]).c_drains == 5
    with pytest.raises(SystemExit):
        parser.parse_args(["--c-drains", "0"])
    assert "must be at least 1" in capsys.readouterr().err


def test_live_ticks_are_stamped_when_they_were_due_not_when_they_left() -> None:
    """A load generator running late (it shares the cores) must show in the latency, not
    vanish from it (coordinated omission): ts is the schedule's time for the tick."""
    prices = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    writer = TickWriter.__new__(TickWriter)
    writer.source = TickSource.of(["A.0", "B.0"], prices, note="")
    writer.next_tick, writer.last_step_ts = 0, 0
    due = 1_700_000_000_000  # long before now: the ticks left late
    first = [orjson.loads(v)["ts"] for _, v, _ in writer._records(2, due_ms=due)]
    assert first == [due, due]
    later = [orjson.loads(v)["ts"] for _, v, _ in writer._records(2, due_ms=due)]
    assert later == [due + 1, due + 1]  # still growing per symbol


def test_a_report_names_the_commit_it_measured() -> None:
    from daemon.bench.report import code_version

    version = code_version()
    assert version["commit"] is None or len(version["commit"]) == 40
    assert isinstance(version["dirty"], bool)
