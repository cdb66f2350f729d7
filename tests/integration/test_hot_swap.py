"""Hot checkpoint swap on the real broker: under steady load, and every rejected case.

Black-box: the daemon runs in-process, ticks go in through Kafka and predictions are read
back from the output topic; the checkpoint directory is the only other channel, exactly
as the retrain job uses it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from daemon.replay import TickStream, replay
from model.checkpoint import load_checkpoint, promote, read_latest
from model.data import load_many
from model.gru import predict_prices
from tests.integration.test_daemon_e2e import assert_same_model_output, produce_stream
from tests.support.daemon import (
    consume_raw,
    daemon_settings,
    expected_windows,
    make_checkpoint,
    running_daemon,
)
from tests.support.polling import wait_until
from tests.unit.test_model_watcher import BAD_CHECKPOINTS, WATCHER_LOGGER

pytestmark = pytest.mark.kafka

WINDOW = 60
REPLAY_RATE = 200.0  # ticks per second: steady load with small normal gaps
MAX_SWAP_GAP_MS = 100
# A CPU-starved run stalls the daemon without any swap too: the swap's gap may then reach
# this multiple of the longest gap elsewhere in the run.
SLOW_MACHINE_FACTOR = 3
# Predictions acknowledged before the swap: mid-stream, clear of the start-up gaps.
OLD_BEFORE_SWAP = 300


@dataclass(frozen=True)
class Out:
    """One prediction as read from the output topic."""

    symbol: str
    ts: int
    predicted: float
    version: str
    produced_at: int
    partition: int
    offset: int
    header_version: str


async def read_predictions(bootstrap: str, topic: str, expected: int) -> list[Out]:
    records = await consume_raw(bootstrap, topic, expected, timeout_s=120)
    out = []
    for r in records:
        v = orjson.loads(r.value)
        out.append(
            Out(
                symbol=v["symbol"],
                ts=v["ts"],
                predicted=v["predicted"],
                version=v["model_version"],
                produced_at=v["produced_at"],
                partition=r.partition,
                offset=r.offset,
                header_version=dict(r.headers)["model_version"].decode(),
            )
        )
    return out


def interleaved_stream(per_symbol: int) -> TickStream:
    """The last ``per_symbol`` real prices of three series, round-robin, one tick each.

    The series cover different years, so merging them by their own dates would play them
    one after another; here every symbol ticks throughout (event time restamped, one day
    per round, so that each symbol's ts still increases).
    """
    series = load_many(["dataset:nasdaq", "dataset:sp500", "dataset:goog"])
    n = len(series)
    day_ms = 86_400_000
    start = int(series[0].ts[-per_symbol])
    return TickStream(
        symbols=np.array([s.symbol for s in series] * per_symbol, dtype=object),
        prices=np.stack([s.prices[-per_symbol:] for s in series], axis=1).ravel(),
        ts=np.repeat(start + day_ms * np.arange(per_symbol, dtype=np.int64), n),
    )


async def produce_at_rate(bootstrap: str, topic: str, stream: TickStream, rate: float) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        await replay(producer, topic, stream, rate=rate)
    finally:
        await producer.stop()


def by_symbol(predictions: list[Out]) -> dict[str, list[Out]]:
    groups: dict[str, list[Out]] = defaultdict(list)
    for p in predictions:
        groups[p.symbol].append(p)
    return groups


def assert_one_prediction_per_tick(predictions: list[Out], stream: TickStream) -> None:
    groups = by_symbol(predictions)
    assert sorted(groups) == sorted(set(stream.symbols.tolist()))
    for symbol, got in groups.items():
        ts = stream.ts[stream.symbols == symbol]
        assert [p.ts for p in got] == ts[WINDOW - 1 :].tolist(), symbol


def reference(root: Path, version: str, windows: np.ndarray) -> np.ndarray:
    return predict_prices(load_checkpoint(root / version).model, windows).numpy()


def sample(service: object, name: str, labels: dict[str, str] | None = None) -> float:
    registry = service.metrics.registry  # type: ignore[attr-defined]
    return float(registry.get_sample_value(name, labels or {}) or 0.0)


async def test_swap_under_steady_load(
    kafka_bootstrap: str,
    daemon_topics: dict[str, str],
    checkpoint_dir: Path,
    unique_group: str,
    tmp_path: Path,
    record_property,
) -> None:
    old = str(read_latest(checkpoint_dir))
    # 1,440 ticks, 7.2 s at 200 ticks/s: OLD_BEFORE_SWAP is reached ~2.4 s in, so the
    # swap lands mid-stream with ~4.8 s to spare on a slow machine.
    per_symbol = 480
    stream = interleaved_stream(per_symbol)
    expected = 3 * (per_symbol - WINDOW + 1)
    # Trained "elsewhere" beforehand (a separate process in production), published below.
    staging = tmp_path / "staging"
    new = make_checkpoint(staging, seed=11)
    settings = daemon_settings(kafka_bootstrap, daemon_topics, checkpoint_dir, unique_group)
    async with running_daemon(settings) as service:
        replaying = asyncio.create_task(
            produce_at_rate(kafka_bootstrap, daemon_topics["input"], stream, REPLAY_RATE)
        )
        # Symbols tick round-robin, so by then the old model has served each of them.
        await wait_until(
            lambda: sample(service, "tickcast_predictions_published_total") >= OLD_BEFORE_SWAP,
            "predictions acknowledged before the swap",
        )
        assert not replaying.done()

        # Publish it as the retrain job does: the finished version directory moves in,
        # then LATEST is replaced atomically. In a thread: promote() fsyncs, and this
        # event loop is the daemon's too (in production the job is another process).
        def publish() -> None:
            (staging / new).rename(checkpoint_dir / new)
            promote(checkpoint_dir, new)

        await asyncio.to_thread(publish)
        await replaying
        predictions = await read_predictions(kafka_bootstrap, daemon_topics["output"], expected)
        await asyncio.sleep(0.2)
        reloads = {
            r: sample(service, "tickcast_model_reloads_total", {"result": r})
            for r in ("success", "rejected")
        }
        info = sample(service, "tickcast_model_info", {"version": new, "device": "cpu"})

    # Every tick from each symbol's 60th on has exactly one prediction.
    assert len(predictions) == expected
    assert_one_prediction_per_tick(predictions, stream)
    assert reloads == {"success": 1.0, "rejected": 0.0}
    assert info == 1.0

    # The version changes exactly once: per symbol old...old new...new, and nothing old is
    # produced after the first new prediction (per output partition, offsets are the
    # daemon's production order; produced_at orders across partitions).
    assert all(p.version == p.header_version for p in predictions)
    assert {p.version for p in predictions} == {old, new}
    for symbol, got in by_symbol(predictions).items():
        versions = [p.version for p in got]
        switch = versions.index(new)
        assert set(versions[:switch]) == {old} and set(versions[switch:]) == {new}, symbol
    for partition in {p.partition for p in predictions}:
        ordered = sorted(
            (p for p in predictions if p.partition == partition), key=lambda p: p.offset
        )
        versions = [p.version for p in ordered]
        if new in versions:
            assert old not in versions[versions.index(new) :]
    last_old = max(p.produced_at for p in predictions if p.version == old)
    first_new = min(p.produced_at for p in predictions if p.version == new)
    assert last_old <= first_new

    # Each prediction is exactly what the model it names computes for its window: no batch
    # was scored by one model and labelled with the other.
    for symbol, got in by_symbol(predictions).items():
        windows = expected_windows(stream.prices[stream.symbols == symbol], WINDOW)
        for version in (old, new):
            rows = [i for i, p in enumerate(got) if p.version == version]
            if rows:
                assert_same_model_output(
                    [got[i].predicted for i in rows],
                    reference(checkpoint_dir, version, windows)[rows],
                    windows[rows],
                )

    # The longest gap between consecutive predictions around the swap (+-0.5 s), on the
    # daemon's own clock (produced_at: one stamp per batch).
    stamps = np.unique([p.produced_at for p in predictions])
    gaps = np.diff(stamps)
    around = (stamps[1:] >= first_new - 500) & (stamps[:-1] <= first_new + 500)
    steady = (stamps[:-1] >= stamps[0] + 500) & (stamps[1:] <= stamps[-1] - 200) & ~around
    swap_gap = int(first_new - last_old)
    longest_around = int(gaps[around].max())
    baseline = int(gaps[steady].max())
    record_property("swap_gap_ms", swap_gap)
    record_property("longest_gap_around_swap_ms", longest_around)
    record_property("longest_gap_without_swap_ms", baseline)
    summary = (
        f"swap gap {swap_gap} ms; longest gap within 0.5 s of the swap {longest_around} ms; "
        f"longest elsewhere {baseline} ms; median {float(np.median(gaps)):.1f} ms"
    )
    print(f"\n{summary}")
    # The swap must not stall serving: under MAX_SWAP_GAP_MS, or on a machine that stalls
    # the daemon longer without any swap, well within the same run's worst such stall.
    limit = max(MAX_SWAP_GAP_MS, SLOW_MACHINE_FACTOR * baseline)
    assert longest_around < limit, summary


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
async def test_a_bad_checkpoint_is_rejected_and_the_old_model_keeps_serving(
    case: str,
    kafka_bootstrap: str,
    daemon_topics: dict[str, str],
    checkpoint_dir: Path,
    unique_group: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = BAD_CHECKPOINTS[case]
    caplog.set_level(logging.INFO, logger=WATCHER_LOGGER)
    old = str(read_latest(checkpoint_dir))
    stream = interleaved_stream(per_symbol=100)
    expected = 3 * (100 - WINDOW + 1)
    head, tail = stream.split(len(stream) // 2)
    settings = daemon_settings(kafka_bootstrap, daemon_topics, checkpoint_dir, unique_group)
    async with running_daemon(settings) as service:
        await produce_stream(kafka_bootstrap, daemon_topics["input"], head)
        version = bad.write(checkpoint_dir, tmp_path)
        deadline = time.monotonic() + 60
        while sample(service, "tickcast_model_reloads_total", {"result": "rejected"}) < 1:
            assert time.monotonic() < deadline, "the bad checkpoint was never looked at"
            await asyncio.sleep(0.05)
        # Serving goes on after the rejection, with the old model.
        await produce_stream(kafka_bootstrap, daemon_topics["input"], tail)
        predictions = await read_predictions(kafka_bootstrap, daemon_topics["output"], expected)
        await asyncio.sleep(0.5)  # a few more polls: the rejection is not repeated
        rejected = sample(service, "tickcast_model_reloads_total", {"result": "rejected"})
        succeeded = sample(service, "tickcast_model_reloads_total", {"result": "success"})
        info = sample(service, "tickcast_model_info", {"version": old, "device": "cpu"})

    assert len(predictions) == expected
    assert_one_prediction_per_tick(predictions, stream)
    assert {p.version for p in predictions} == {old}
    assert (rejected, succeeded, info) == (1.0, 0.0, 1.0)
    lines = [r for r in caplog.records if r.name == WATCHER_LOGGER and r.levelno >= logging.WARNING]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.ERROR
    assert version in lines[0].getMessage() and bad.reason in lines[0].getMessage()
    assert not (tmp_path / "pwned").exists()
