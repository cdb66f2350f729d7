"""A restore that outlasts the group session keeps the member in the group.

aiokafka sends no heartbeats while a rebalance listener runs. When the daemon restored
inside on_partitions_assigned, a restore longer than the session timeout (a long partition
without the state topic) got the member evicted: a rebalance, another restore, evicted
again. Restores now run in the background with the partitions paused. Here the restore is
held for one and a half session timeouts before it reads the topic.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient

import daemon.service
from tests.integration.test_daemon_e2e import (
    WINDOW,
    check_predictions,
    produce_stream,
    real_stream,
)
from tests.integration.test_daemon_flow_control import group_state
from tests.support.daemon import consume, daemon_settings, running_daemon

pytestmark = pytest.mark.kafka

SESSION_TIMEOUT_MS = 6_000  # the broker's smallest (group.min.session.timeout.ms)
PER_SYMBOL = 80


async def test_a_restore_longer_than_the_session_keeps_the_member(
    kafka_bootstrap, daemon_topics, checkpoint_dir, unique_group, monkeypatch
):
    real_restore = daemon.service.restore_windows
    calls: list[dict[Any, int]] = []

    async def slow_restore(windows: Any, until: dict[Any, int], **kwargs: Any) -> Any:
        calls.append(dict(until))
        await asyncio.sleep(1.5 * SESSION_TIMEOUT_MS / 1000)
        return await real_restore(windows, until, **kwargs)

    monkeypatch.setattr(daemon.service, "restore_windows", slow_restore)
    stream = real_stream(per_symbol=PER_SYMBOL)
    settings = daemon_settings(
        kafka_bootstrap,
        daemon_topics,
        checkpoint_dir,
        unique_group,
        session_timeout_ms=SESSION_TIMEOUT_MS,
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        # Ready only once the restore is done: 9 s, past the 6 s session.
        async with running_daemon(settings) as service:
            assert await group_state(admin, unique_group) == ("Stable", 1)
            await produce_stream(kafka_bootstrap, daemon_topics["input"], stream)
            expected = 3 * (PER_SYMBOL - WINDOW + 1)
            predictions = await consume(kafka_bootstrap, daemon_topics["output"], expected)
            assert await group_state(admin, unique_group) == ("Stable", 1)
            restores = service.metrics.registry.get_sample_value("tickcast_restore_seconds_count")
    finally:
        await admin.close()
    # An eviction would have meant a rebalance and a second restore.
    assert len(calls) == 1, f"{len(calls)} restores: the member was evicted and rejoined"
    assert restores == 1
    check_predictions(predictions, stream, checkpoint_dir)
