"""A restore that fails inside the rebalance stops the daemon instead of leaving the
partitions parked: aiokafka logs a listener's exception and carries on, so without this
the partitions' ticks would queue unscored and uncommitted for good."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from daemon.metrics import DaemonMetrics
from daemon.service import TickcastService
from daemon.settings import Settings
from tests.support.daemon import make_checkpoint


class BrokerGone:
    """The consumer as on_assigned sees it, with the group coordinator unreachable."""

    async def committed(self, tp: TopicPartition) -> int:
        raise KafkaConnectionError(f"no coordinator for {tp}")


async def test_failed_restore_stops_the_daemon(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_checkpoint(tmp_path)
    settings = Settings(checkpoint_dir=tmp_path, device="cpu")
    service = TickcastService(settings, DaemonMetrics(CollectorRegistry(), process=False))
    service._consumer = BrokerGone()
    tp = TopicPartition("ticks", 0)
    try:
        await service.on_assigned([tp])
    finally:
        service._inference.shutdown()
    assert service.failed and service.should_exit.is_set()
    assert tp not in service._ready_partitions
    assert "restoring partitions" in caplog.text and "no coordinator" in caplog.text
