"""``tickcast retrain --from-kafka`` on the real broker: the daemon's input topic as data."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from model.__main__ import main as retrain_main
from model.checkpoint import load_latest, read_latest, read_meta
from model.data import PriceSeries, load_many
from model.kafka_source import TickColumns, read_topic
from tests.support.daemon import produce

pytestmark = pytest.mark.kafka

PER_SYMBOL = 300
TINY = ["--epochs", "1", "--hidden-size", "8", "--batch-size", "512", "--device", "cpu"]
GARBAGE: list[tuple[bytes | None, bytes]] = [
    (None, b"not json at all"),
    (None, b"\xff\xfe\x00"),
    (b"X", orjson.dumps({"symbol": "X", "price": -1.0, "ts": 1_700_000_000_000})),
    (b"X", orjson.dumps({"symbol": "X", "price": "1.0", "ts": 1_700_000_000_000})),
    (b"X", orjson.dumps({"symbol": "X", "ts": 1_700_000_000_000})),
    (b"X", orjson.dumps({"symbol": "X", "price": 1.0, "ts": 1_700_000_000_000_000})),
    (None, b"[1, 2, 3]"),
    (None, b""),
]


def real_series() -> list[PriceSeries]:
    return [
        PriceSeries(s.symbol, s.source, s.ts[-PER_SYMBOL:], s.prices[-PER_SYMBOL:])
        for s in load_many(["dataset:nasdaq", "dataset:sp500"])
    ]


def tick(symbol: str, price: float, ts: int) -> tuple[bytes, bytes]:
    return symbol.encode(), orjson.dumps({"symbol": symbol, "price": price, "ts": ts})


@pytest.fixture
def tick_topic(topic_factory, kafka_bootstrap: str) -> str:
    """A 3-partition topic with two real series, garbage, duplicates and a too-short symbol."""

    async def fill() -> str:
        topic = await topic_factory(partitions=3, prefix="ticks")
        records: list[tuple[bytes | None, bytes]] = []
        for s in real_series():
            records += [
                tick(s.symbol, p, t) for p, t in zip(s.prices.tolist(), s.ts.tolist(), strict=True)
            ]
        records += GARBAGE
        # A redelivered stretch (same symbol and ts, even with another price): first wins.
        nasdaq = real_series()[0]
        records += [tick("NASDAQ", 1.0, int(t)) for t in nasdaq.ts[:5].tolist()]
        records += [tick("TINY", 10.0 + i, 1_700_000_000_000 + i) for i in range(10)]
        await produce(kafka_bootstrap, topic, records)
        return topic

    return asyncio.run(fill())


def test_retrain_from_kafka_trains_on_the_retained_ticks(
    kafka_bootstrap: str,
    tick_topic: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="model.kafka_source")
    caplog.set_level(logging.INFO, logger="model.retrain")
    root = tmp_path / "checkpoints"
    code = retrain_main(
        [
            "--from-kafka",
            "--bootstrap-servers",
            kafka_bootstrap,
            "--input-topic",
            tick_topic,
            "--checkpoint-dir",
            str(root),
            "--since",
            "1h",  # all of it: every record was written in the last minute
            "--json",
            "--no-progress",
            *TINY,
        ]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["promoted"] is True
    assert read_latest(root) == report["version"]
    meta = read_meta(root / report["version"])
    load_latest(root)  # a loadable checkpoint

    # meta.training_data: both symbols, from the topic, starting at each one's first tick.
    series = {s.symbol: s for s in real_series()}
    ranges = {r.symbol: r for r in meta.training_data}
    assert sorted(ranges) == ["NASDAQ", "SP500"]
    for symbol, r in ranges.items():
        s = series[symbol]
        assert r.source == f"kafka:{tick_topic}"
        assert (r.start, r.end) == s.iso_range(0, r.rows)
        assert 0 < r.rows < PER_SYMBOL  # a prefix: validation and test rows held out
    test_ranges = {r["symbol"]: r for r in meta.evaluation["test_data"]}
    for symbol, s in series.items():
        assert test_ranges[symbol]["end"] == s.iso_range(len(s) - 1)[1]

    # The read's bookkeeping: garbage skipped by reason, duplicates and TINY left out.
    [summary_line] = [r.getMessage() for r in caplog.records if "training data from" in r.msg]
    summary = json.loads(summary_line.split(": ", 1)[1])
    assert summary["records"] == 2 * PER_SYMBOL + len(GARBAGE) + 5 + 10
    assert summary["invalid"] == {
        "not_json": 1,
        "not_utf8": 1,
        "bad_price": 2,
        "missing_field": 1,
        "bad_ts": 1,
        "not_object": 1,
        "empty": 1,
    }
    assert summary["duplicates"] == 5
    assert summary["symbols"] == {"NASDAQ": PER_SYMBOL, "SP500": PER_SYMBOL}
    assert summary["too_short"] == {"TINY": 10}
    assert any("skipping TINY" in r.getMessage() for r in caplog.records)


def test_a_common_time_split_leaves_out_a_symbol_that_joined_late(
    kafka_bootstrap: str, topic_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """NASDAQ and SP500 over the same 300 real days, and LATE, SP500's last 100 of them
    under another symbol: with --split time LATE has no training target before the common
    validation period and is left out; split by series, it would be trained on too."""

    async def fill() -> str:
        topic = await topic_factory(partitions=3, prefix="ticks")
        sp500 = real_series()[1]
        stretch = zip(sp500.prices[-100:].tolist(), sp500.ts[-100:].tolist(), strict=True)
        late = [tick("LATE", p, t) for p, t in stretch]
        records = [
            tick(s.symbol, p, t)
            for s in real_series()
            for p, t in zip(s.prices.tolist(), s.ts.tolist(), strict=True)
        ]
        await produce(kafka_bootstrap, topic, records + late)
        return topic

    topic = asyncio.run(fill())
    common = ["--from-kafka", "--bootstrap-servers", kafka_bootstrap, "--input-topic", topic]
    reports = {}
    for split in ("time", "series"):
        argv = [*common, "--split", split, "--checkpoint-dir", str(tmp_path / split)]
        assert retrain_main([*argv, "--json", "--no-progress", *TINY]) == 0
        reports[split] = json.loads(capsys.readouterr().out)
    assert reports["time"]["series"] == ["NASDAQ", "SP500"]
    assert reports["series"]["series"] == ["LATE", "NASDAQ", "SP500"]
    meta = read_meta(tmp_path / "time" / reports["time"]["version"])
    assert meta.evaluation["split_by"] == "time"
    fitted_until = max(r.end for r in meta.training_data)
    assert fitted_until < min(r["start"] for r in meta.evaluation["test_data"])


def test_max_ticks_reads_only_the_newest_records(
    kafka_bootstrap: str,
    topic_factory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two real series written in two rounds, the older 150 days of each first: with
    --max-ticks set to the second round's size, every partition starts at one record time,
    and the checkpoint is trained and tested on the newer days alone."""
    half = PER_SYMBOL // 2
    older = [
        tick(s.symbol, p, t)
        for s in real_series()
        for p, t in zip(s.prices[:half].tolist(), s.ts[:half].tolist(), strict=True)
    ]
    newer = [
        tick(s.symbol, p, t)
        for s in real_series()
        for p, t in zip(s.prices[half:].tolist(), s.ts[half:].tolist(), strict=True)
    ]

    async def fill() -> str:
        topic = await topic_factory(partitions=3, prefix="ticks")
        await produce(kafka_bootstrap, topic, older)
        await asyncio.sleep(0.05)  # every newer record timestamp is later than every older
        await produce(kafka_bootstrap, topic, newer)
        return topic

    topic = asyncio.run(fill())
    caplog.set_level(logging.INFO, logger="model.retrain")
    common = ["--from-kafka", "--bootstrap-servers", kafka_bootstrap, "--input-topic", topic]
    argv = [*common, "--split", "time", "--max-ticks", str(len(newer))]
    code = retrain_main([*argv, "--checkpoint-dir", str(tmp_path), "--json", *TINY])
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    [summary_line] = [r.getMessage() for r in caplog.records if "training data from" in r.msg]
    summary = json.loads(summary_line.split(": ", 1)[1])
    assert summary["in_range"] == len(older) + len(newer)
    assert summary["cut_to_newest"] is True and summary["cut_to_newest_since"] is not None
    assert summary["records"] == len(newer)
    assert summary["symbols"] == {"NASDAQ": PER_SYMBOL - half, "SP500": PER_SYMBOL - half}
    meta = read_meta(tmp_path / report["version"])
    series = {s.symbol: s for s in real_series()}
    for r in meta.training_data:
        assert r.start == series[r.symbol].iso_range(half)[0]  # the newer days' first

    # One record less: the cut moves later still, and what is read is the newest of each.
    columns = TickColumns()
    read = asyncio.run(read_topic(kafka_bootstrap, topic, columns, max_records=len(newer) - 1))
    assert read.in_range == len(older) + len(newer) and read.cut
    assert columns.records < len(newer)
    for one in columns.to_ticks(topic=topic, min_ticks=1).series:
        assert one.ts.tolist() == series[one.symbol].ts[-len(one) :].tolist()


def test_since_after_every_record_finds_nothing(
    kafka_bootstrap: str, tick_topic: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = retrain_main(
        [
            "--from-kafka",
            "--bootstrap-servers",
            kafka_bootstrap,
            "--input-topic",
            tick_topic,
            "--checkpoint-dir",
            str(tmp_path),
            "--since",
            "2099-01-01T00:00Z",
            *TINY,
        ]
    )
    assert code == 2
    assert "holds no symbol" in capsys.readouterr().err
    assert read_latest(tmp_path) is None


@pytest.mark.parametrize(
    "argv",
    [
        ["--data", "dataset:goog", "--from-kafka"],
        [],
        ["--from-kafka", "--every", "soon"],
        ["--from-kafka", "--every", "0s"],
        ["--from-kafka", "--since", "last tuesday"],
        ["--from-kafka", "--max-ticks", "-1"],
        ["--from-kafka", "--max-ticks", "many"],
    ],
)
def test_source_and_schedule_flags_are_checked(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        retrain_main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_every_keeps_retraining_until_sigterm(
    kafka_bootstrap: str, tick_topic: str, tmp_path: Path
) -> None:
    root = tmp_path / "checkpoints"
    log_path = tmp_path / "retrain.log"
    env = {
        **os.environ,
        "TICKCAST_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "TICKCAST_INPUT_TOPIC": tick_topic,
        "TICKCAST_CHECKPOINT_DIR": str(root),
    }
    argv = [sys.executable, "-m", "model", "--from-kafka", "--every", "1s", "--no-progress"]
    with log_path.open("wb") as log:
        process = subprocess.Popen([*argv, *TINY], env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 240
            while "retrain run 2 done" not in log_path.read_text():
                assert process.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            code = process.wait(120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    runs = int(text.split("retrain scheduler stopped after ")[1].split()[0])
    assert runs >= 2
    versions = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(versions) == runs  # one checkpoint per run, promoted or not
    assert read_latest(root) in versions
