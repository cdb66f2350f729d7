"""Window snapshots in the compacted state topic make restores short and stay exact."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer

from daemon.replay import replay
from tests.integration.test_daemon_e2e import produce_stream
from tests.integration.test_daemon_recovery import (
    check_complete,
    expected_count,
    split_stream,
)
from tests.integration.test_scale_out import long_real_stream
from tests.support.daemon import DaemonProcess, consume, daemon_settings, running_daemon

pytestmark = pytest.mark.kafka


@pytest.fixture
async def state_topics(topic_factory) -> dict[str, str]:
    return {
        "input": await topic_factory(partitions=3, prefix="ticks"),
        "output": await topic_factory(partitions=3, prefix="predictions"),
        "dlq": await topic_factory(partitions=1, prefix="dlq"),
        "state": await topic_factory(
            partitions=3, prefix="state", config={"cleanup.policy": "compact"}
        ),
    }


def settings_for(kafka_bootstrap, topics, checkpoint_dir, group):
    return daemon_settings(
        kafka_bootstrap,
        topics,
        checkpoint_dir,
        group,
        state_topic=topics["state"],
        snapshot_interval_s=0.1,
    )


async def test_restart_loads_snapshots_and_replays_only_the_tail(
    kafka_bootstrap, state_topics, checkpoint_dir, unique_group
):
    stream = long_real_stream()
    first, second = split_stream(stream, int(len(stream) * 0.8))
    settings = settings_for(kafka_bootstrap, state_topics, checkpoint_dir, unique_group)
    async with running_daemon(settings) as one:
        await produce_stream(kafka_bootstrap, state_topics["input"], first)
        await consume(kafka_bootstrap, state_topics["output"], expected_count(first))
        await asyncio.sleep(0.5)  # let a snapshot after the last commit go out
        written = one.metrics.registry.get_sample_value("tickcast_snapshot_symbols_total")
    assert written and written >= 5

    async with running_daemon(settings) as two:
        registry = two.metrics.registry
        loaded = registry.get_sample_value("tickcast_restored_snapshots_total")
        replayed = registry.get_sample_value("tickcast_restored_ticks_total")
        await produce_stream(kafka_bootstrap, state_topics["input"], second)
        total = expected_count(stream)
        predictions = await consume(kafka_bootstrap, state_topics["output"], total, settle_s=1.0)
    assert loaded == 5, "every symbol's window comes from its snapshot"
    assert replayed is not None
    assert replayed < len(first) / 4, f"replayed {replayed} of {len(first)} records"
    check_complete(predictions, stream, checkpoint_dir, allow_duplicates=False)


async def test_sigkill_with_snapshots_loses_nothing(
    kafka_bootstrap, state_topics, checkpoint_dir, unique_group, tmp_path
):
    stream = long_real_stream()
    settings = settings_for(kafka_bootstrap, state_topics, checkpoint_dir, unique_group)
    env_extra = {
        "TICKCAST_STATE_TOPIC": state_topics["state"],
        "TICKCAST_SNAPSHOT_INTERVAL_S": "0.1",
    }
    daemon = DaemonProcess(settings, tmp_path / "a.log")
    daemon.env.update(env_extra)
    daemon.start()
    await daemon.wait_ready()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        feeding = asyncio.create_task(replay(producer, state_topics["input"], stream, rate=300))
        await asyncio.sleep(2.0)
        assert not feeding.done()
        daemon.kill()
        await feeding
    finally:
        await producer.stop()
    again = DaemonProcess(settings, tmp_path / "b.log")
    again.env.update(env_extra)
    again.start()
    await again.wait_ready()
    predictions = await consume(
        kafka_bootstrap, state_topics["output"], expected_count(stream), settle_s=1.0
    )
    assert again.terminate() == 0
    assert "from snapshots" in (tmp_path / "b.log").read_text()
    check_complete(predictions, stream, checkpoint_dir, allow_duplicates=True)
