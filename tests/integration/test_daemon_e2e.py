"""End to end on the real broker: real ticks in, one correct prediction per tick out."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from daemon.replay import TickStream, replay
from model.data import load_many
from tests.support.daemon import (
    consume,
    daemon_settings,
    expected_windows,
    reference_predictions,
    running_daemon,
)

pytestmark = pytest.mark.kafka

WINDOW = 60


def real_stream(per_symbol: int) -> TickStream:
    """The last ``per_symbol`` real prices of three series, interleaved by time."""
    series = load_many(["dataset:nasdaq", "dataset:sp500", "dataset:goog"])
    trimmed = [
        type(s)(s.symbol, s.source, s.ts[-per_symbol:], s.prices[-per_symbol:]) for s in series
    ]
    return TickStream.merge(trimmed)


def assert_same_model_output(got, expected, windows) -> None:
    """Equal to 1e-5 in the model's own output space (prices scaled by each window's span).

    The GRU computes in float32, whose rounding depends on the batch's shape; in price
    units that is ~1e-8 of the window's span, so compare there rather than in dollars.
    """
    span = windows.max(axis=1) - windows.min(axis=1)
    scaled_error = np.abs(np.asarray(got) - expected) / span
    assert scaled_error.max() <= 1e-5, f"max scaled error {scaled_error.max():.3g}"


async def produce_stream(bootstrap: str, topic: str, stream: TickStream) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        await replay(producer, topic, stream)
    finally:
        await producer.stop()


def check_predictions(predictions, stream: TickStream, checkpoint_dir) -> None:
    """One prediction per tick from each symbol's 60th on, equal to the model's own."""
    by_symbol: dict[str, list] = defaultdict(list)
    for p in predictions:
        by_symbol[p.symbol].append(p)
    symbols = sorted(set(stream.symbols.tolist()))
    assert sorted(by_symbol) == symbols
    for symbol in symbols:
        mask = stream.symbols == symbol
        prices, ts = stream.prices[mask], stream.ts[mask]
        got = by_symbol[symbol]
        # Keys, per-symbol order, exactly one per tick from the 60th.
        assert all(p.key == symbol.encode() for p in got)
        assert [p.ts for p in got] == ts[WINDOW - 1 :].tolist()
        assert [p.price for p in got] == prices[WINDOW - 1 :].tolist()
        windows = expected_windows(prices, WINDOW)
        expected = reference_predictions(checkpoint_dir, windows)
        assert_same_model_output([p.predicted for p in got], expected, windows)
        assert len({p.partition for p in got}) == 1  # keyed: one output partition per symbol


async def test_replayed_real_ticks_get_one_exact_prediction_each(
    kafka_bootstrap, daemon_topics, checkpoint_dir, unique_group
):
    stream = real_stream(per_symbol=150)
    settings = daemon_settings(kafka_bootstrap, daemon_topics, checkpoint_dir, unique_group)
    async with running_daemon(settings) as service:
        await produce_stream(kafka_bootstrap, daemon_topics["input"], stream)
        expected = 3 * (150 - WINDOW + 1)
        predictions = await consume(
            kafka_bootstrap, daemon_topics["output"], expected, settle_s=1.0
        )
        metrics = service.metrics
        registry = metrics.registry
    check_predictions(predictions, stream, checkpoint_dir)
    assert registry.get_sample_value("tickcast_ticks_consumed_total") == len(stream)
    assert registry.get_sample_value("tickcast_predictions_published_total") == expected
    # Every tick is accounted for: predicted, or kept while its symbol's window filled.
    assert registry.get_sample_value("tickcast_ticks_warming_up_total") == 3 * (WINDOW - 1)
    assert registry.get_sample_value("tickcast_symbols_tracked") == 3
    commits = {
        result: registry.get_sample_value("tickcast_offset_commits_total", {"result": result})
        for result in ("committed", "failed")
    }
    assert (commits["committed"] or 0) >= 1 and commits["failed"] == 0, commits
    version = predictions[0].model_version
    assert all(p.headers["model_version"] == version.encode() for p in predictions)
    assert all(int(p.headers["input_offset"]) >= 0 for p in predictions)
