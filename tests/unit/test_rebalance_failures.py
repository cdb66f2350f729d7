"""Rebalance failures. Exactly-once: a batch whose partitions were revoked before it was
committed is never committed. (A failed restore: tests/unit/test_background_restore.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from daemon.metrics import DaemonMetrics
from daemon.service import TickcastService
from daemon.settings import Settings
from tests.support.daemon import make_checkpoint


class RecordingProducer:
    """Counts the transactions opened; the test fails if one is."""

    def __init__(self) -> None:
        self.transactions = 0

    def transaction(self) -> object:
        self.transactions += 1
        raise AssertionError("no transaction may start for a batch of moved partitions")


async def test_exactly_once_never_commits_a_batch_of_revoked_partitions(tmp_path: Path) -> None:
    """A batch still in flight when its partitions were revoked (the drain timed out)
    is not committed: the offset commit would not be fenced, and the new owner's
    predictions of the same ticks would be duplicates."""
    from daemon.pipeline import Chunk, ScoringRows
    from daemon.service import PartitionsMovedError

    make_checkpoint(tmp_path)
    settings = Settings(
        checkpoint_dir=tmp_path, device="cpu", delivery="exactly_once", transactional_id="t-1"
    )
    service = TickcastService(settings, DaemonMetrics(CollectorRegistry(), process=False))
    producer = RecordingProducer()
    service._producer = producer
    service._publisher = object()  # type: ignore[assignment]
    kept, moved = TopicPartition("ticks", 0), TopicPartition("ticks", 1)
    service._ready_partitions = {kept}  # partition 1 was revoked meanwhile
    rows = ScoringRows.empty(60)
    chunks = [
        Chunk(rows=rows, bad=[], commit={kept: 10}),
        Chunk(rows=rows, bad=[], commit={moved: 7}),
    ]
    try:
        with pytest.raises(PartitionsMovedError, match=r"partitions \[1\] moved"):
            await service._publish_in_transaction([], [], chunks)
    finally:
        service._inference.shutdown()
    assert producer.transactions == 0
