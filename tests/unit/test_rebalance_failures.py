"""Rebalance failures. Exactly-once: a batch whose partitions were revoked before it was
committed is never committed. (A failed restore: tests/unit/test_background_restore.py.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace

import pytest
from aiokafka.structs import TopicPartition

from daemon.service import TickcastService
from tests.unit.conftest import ServiceFactory


@pytest.fixture
def service(service_factory: ServiceFactory) -> TickcastService:
    """An exactly-once daemon, built but not started."""
    return service_factory(delivery="exactly_once", transactional_id="t-1")


class RecordingProducer:
    """Counts the transactions opened; the test fails if one is."""

    def __init__(self) -> None:
        self.transactions = 0

    def transaction(self) -> object:
        self.transactions += 1
        raise AssertionError("no transaction may start for a batch of moved partitions")


async def test_exactly_once_never_commits_a_batch_of_revoked_partitions(
    service: TickcastService,
) -> None:
    """A batch still in flight when its partitions were revoked (the drain timed out)
    is not committed: the offset commit would not be fenced, and the new owner's
    predictions of the same ticks would be duplicates."""
    from daemon.pipeline import Chunk, ScoringRows
    from daemon.service import PartitionsMovedError

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
    with pytest.raises(PartitionsMovedError, match=r"partitions \[1\] moved"):
        await service._publish_in_transaction([], [], chunks)
    assert producer.transactions == 0


class TransactionRecorder:
    """A transactional producer that records what each transaction did."""

    def __init__(self) -> None:
        self.committed_offsets: list[dict[TopicPartition, int]] = []
        self.aborted = 0

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        try:
            yield
        except BaseException:
            self.aborted += 1
            raise

    async def send_offsets_to_transaction(
        self, offsets: dict[TopicPartition, int], group_id: str
    ) -> None:
        self.committed_offsets.append(offsets)


class RebalancingPublisher:
    """Acknowledges each send after calling ``during_acks`` (a rebalance meanwhile)."""

    def __init__(self, during_acks: Callable[[], None]) -> None:
        self.during_acks = during_acks

    async def send(self, topic: str, records: list[object]) -> list[SimpleNamespace]:
        ack = asyncio.get_running_loop().create_future()

        def acknowledge() -> None:
            self.during_acks()
            ack.set_result(None)

        asyncio.get_running_loop().call_soon(acknowledge)
        return [SimpleNamespace(future=ack)]


@pytest.mark.parametrize("reassigned", [False, True], ids=["revoked", "revoked-and-back"])
async def test_exactly_once_aborts_when_a_rebalance_ends_during_the_acks(
    service: TickcastService, reassigned: bool
) -> None:
    """The check before the transaction is not enough: a revocation whose drain timed out
    while the acks were awaited (and maybe the same partition assigned here again and
    restored) must abort the transaction, not commit the old assignment's offsets."""
    from daemon.pipeline import Chunk, ScoringRows
    from daemon.service import PartitionsMovedError

    tp = TopicPartition("ticks", 0)
    service._ready_partitions = {tp}

    def rebalance() -> None:
        service._assignment += 1
        if not reassigned:
            service._ready_partitions.clear()

    producer = TransactionRecorder()
    service._producer = producer
    service._publisher = RebalancingPublisher(rebalance)  # type: ignore[assignment]
    chunk = Chunk(rows=ScoringRows.empty(60), bad=[], commit={tp: 10}, assignment=0)
    with pytest.raises(PartitionsMovedError, match=r"partitions \[0\] moved"):
        await service._publish_in_transaction([], [], [chunk])
    assert producer.committed_offsets == [] and producer.aborted == 1


async def test_exactly_once_commits_a_batch_of_the_current_assignment(
    service: TickcastService,
) -> None:
    from daemon.pipeline import Chunk, ScoringRows

    tp = TopicPartition("ticks", 0)
    service._ready_partitions = {tp}
    service._assignment = 3
    producer = TransactionRecorder()
    service._producer = producer
    service._publisher = RebalancingPublisher(lambda: None)  # type: ignore[assignment]
    chunk = Chunk(rows=ScoringRows.empty(60), bad=[], commit={tp: 10}, assignment=3)
    await service._publish_in_transaction([], [], [chunk])
    assert producer.committed_offsets == [{tp: 10}] and producer.aborted == 0
