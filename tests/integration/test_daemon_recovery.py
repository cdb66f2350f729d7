"""Restarts on the real broker: SIGKILL, graceful stop, and a broker outage.

Each test replays real ticks while the daemon is stopped or the broker restarted, then
checks the at-least-once contract: every tick from a symbol's 60th on has a prediction
(duplicates allowed after a crash, none after a graceful stop), and every value equals an
uninterrupted run's, because windows are rebuilt from the input topic on assignment.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from tests.integration.test_daemon_e2e import (
    WINDOW,
    assert_same_model_output,
    produce_stream,
    real_stream,
)
from tests.support.daemon import (
    DaemonProcess,
    consume,
    daemon_settings,
    expected_windows,
    reference_predictions,
    running_daemon,
)
from tests.support.polling import wait_until

pytestmark = pytest.mark.kafka

PER_SYMBOL = 160
BEFORE_STOP = 30  # predictions the first instance publishes before it is stopped


def expected_count(stream) -> int:
    return sum(
        max(0, int((stream.symbols == s).sum()) - WINDOW + 1) for s in set(stream.symbols.tolist())
    )


def check_complete(predictions, stream, checkpoint_dir, *, allow_duplicates: bool) -> None:
    seen = Counter((p.symbol, p.ts) for p in predictions)
    for symbol in set(stream.symbols.tolist()):
        mask = stream.symbols == symbol
        prices, ts = stream.prices[mask], stream.ts[mask]
        wanted = ts[WINDOW - 1 :].tolist()
        missing = [t for t in wanted if seen[(symbol, t)] == 0]
        assert not missing, f"{symbol}: {len(missing)} ticks without a prediction"
        if not allow_duplicates:
            dupes = [t for t in wanted if seen[(symbol, t)] > 1]
            assert not dupes, f"{symbol}: {len(dupes)} duplicate predictions"
        reference = dict(
            zip(
                wanted,
                reference_predictions(checkpoint_dir, expected_windows(prices, WINDOW)).tolist(),
                strict=True,
            )
        )
        windows = dict(zip(wanted, expected_windows(prices, WINDOW), strict=True))
        for p in predictions:
            if p.symbol == symbol:
                assert_same_model_output([p.predicted], reference[p.ts], windows[p.ts][None, :])


def published(service) -> float:
    return service.metrics.registry.get_sample_value("tickcast_predictions_published_total")


async def test_sigkill_mid_stream_then_restart_loses_nothing(
    kafka_bootstrap, daemon_topics, checkpoint_dir, unique_group, tmp_path
):
    stream = real_stream(PER_SYMBOL)
    settings = daemon_settings(kafka_bootstrap, daemon_topics, checkpoint_dir, unique_group)
    daemon = DaemonProcess(settings, tmp_path / "daemon.log")
    daemon.start()
    await daemon.wait_ready()
    first, second = stream.split(len(stream) // 2)
    await produce_stream(kafka_bootstrap, daemon_topics["input"], first)
    # Kill while it is working through the first half (some predictions are out).
    await consume(kafka_bootstrap, daemon_topics["output"], 1, timeout_s=60)
    daemon.kill()
    await produce_stream(kafka_bootstrap, daemon_topics["input"], second)
    restarted = DaemonProcess(settings, tmp_path / "daemon2.log")
    restarted.start()
    await restarted.wait_ready()
    total = expected_count(stream)
    predictions = await consume(kafka_bootstrap, daemon_topics["output"], total, settle_s=1.0)
    assert restarted.terminate() == 0
    check_complete(predictions, stream, checkpoint_dir, allow_duplicates=True)


async def test_graceful_stop_mid_stream_and_restart_has_no_gaps_and_no_duplicates(
    kafka_bootstrap, daemon_topics, checkpoint_dir, unique_group
):
    from aiokafka import AIOKafkaProducer

    from daemon.replay import replay

    stream = real_stream(PER_SYMBOL)
    settings = daemon_settings(kafka_bootstrap, daemon_topics, checkpoint_dir, unique_group)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        # Ticks keep arriving at a steady rate while the daemon stops and starts again; the
        # tail is sent only once the first instance has stopped, so the stop is mid-stream
        # however long it takes (the head holds BEFORE_STOP predictions many times over).
        head, tail = stream.split(len(stream) // 2)
        async with running_daemon(settings) as first:
            feeding = asyncio.create_task(replay(producer, daemon_topics["input"], head, rate=150))
            await wait_until(
                lambda: published(first) >= BEFORE_STOP, "predictions of the first instance"
            )
        await feeding
        feeding = asyncio.create_task(replay(producer, daemon_topics["input"], tail, rate=150))
        async with running_daemon(settings) as second:
            await feeding
            total = expected_count(stream)
            predictions = await consume(
                kafka_bootstrap, daemon_topics["output"], total, settle_s=1.5
            )
            restored = second.metrics.registry.get_sample_value("tickcast_restored_ticks_total")
    finally:
        await producer.stop()
    assert restored and restored > 0, "the second instance must rebuild windows from the topic"
    assert len(predictions) == total
    check_complete(predictions, stream, checkpoint_dir, allow_duplicates=False)


async def test_broker_restart_mid_stream_daemon_recovers_by_itself(
    kafka_broker, kafka_bootstrap, daemon_topics, checkpoint_dir, unique_group
):
    stream = real_stream(PER_SYMBOL)
    first, second = stream.split(len(stream) // 2)
    settings = daemon_settings(kafka_bootstrap, daemon_topics, checkpoint_dir, unique_group)
    async with running_daemon(settings) as service:
        await produce_stream(kafka_bootstrap, daemon_topics["input"], first)
        await consume(kafka_bootstrap, daemon_topics["output"], expected_count(first), settle_s=0.5)
        await asyncio.to_thread(kafka_broker.stop)
        await asyncio.sleep(2.0)
        await asyncio.to_thread(kafka_broker.start)
        await produce_stream(kafka_bootstrap, daemon_topics["input"], second)
        total = expected_count(stream)
        predictions = await consume(
            kafka_bootstrap, daemon_topics["output"], total, timeout_s=120, settle_s=1.0
        )
        assert not service.should_exit.is_set()
    check_complete(predictions, stream, checkpoint_dir, allow_duplicates=True)
