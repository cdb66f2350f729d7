"""When ``getmany()`` raises, every ready partition goes back to what was processed (the
failed call dropped what it had read), a batch aiokafka cannot parse is read once more
before it is dead-lettered, and other fetch errors are retried; and the lag loop outlives a
rebalance in the middle of its reads."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka.errors import CorruptRecordException, KafkaConnectionError
from aiokafka.structs import TopicPartition

from daemon import raw_records
from daemon.service import TickcastService
from tests.unit.conftest import ServiceFactory

P0, P1 = TopicPartition("ticks", 0), TopicPartition("ticks", 1)


class SeekingConsumer:
    def __init__(self) -> None:
        self.seeks: list[tuple[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return {P0, P1}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))


@pytest.fixture
def service(service_factory: ServiceFactory, monkeypatch: pytest.MonkeyPatch) -> TickcastService:
    service = service_factory()
    service._positions = {P0: 65, P1: 40}
    service._ready_partitions = {P0, P1}
    skipped: list[Any] = []

    async def skip(consumer: object, exc: BaseException, found: Any) -> None:
        skipped.append(found)

    monkeypatch.setattr(service, "_skip_unreadable", skip)
    service.skipped = skipped  # type: ignore[attr-defined]
    return service


async def test_an_unparsable_batch_is_read_once_more_then_dead_lettered(
    service: TickcastService, monkeypatch: pytest.MonkeyPatch
) -> None:
    where = {"found": (P0, 65, 70)}
    monkeypatch.setattr(raw_records, "unreadable_record", lambda exc: where["found"])
    consumer = SeekingConsumer()
    error = CorruptRecordException("Invalid CRC")
    await service._fetch_failed(consumer, error)
    assert service.skipped == []  # type: ignore[attr-defined]
    assert sorted(consumer.seeks) == [(P0, 65), (P1, 40)]  # both back to what was processed
    await service._fetch_failed(consumer, error)
    assert service.skipped == [(P0, 65, 70)]  # type: ignore[attr-defined]
    # Elsewhere later: read once more again first.
    where["found"] = (P1, 90, 95)
    await service._fetch_failed(consumer, error)
    assert service.skipped == [(P0, 65, 70)]  # type: ignore[attr-defined]


async def test_a_batch_read_fine_on_the_second_try_is_not_dead_lettered(
    service: TickcastService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CRC error in transit: the next fetch reads the batch, the one after fails at a
    different batch, which is read once more in its turn."""
    found = iter([(P0, 65, 70), (P0, 80, 85)])
    monkeypatch.setattr(raw_records, "unreadable_record", lambda exc: next(found))
    for _ in range(2):
        await service._fetch_failed(SeekingConsumer(), CorruptRecordException("CRC"))
    assert service.skipped == []  # type: ignore[attr-defined]


async def test_other_fetch_errors_are_retried_where_the_consumer_stands(
    service: TickcastService,
) -> None:
    """aiokafka raises those only when it handed nothing over, and past a record too large
    to fetch it moves on by itself: a rewind would bring that error back for good."""
    consumer = SeekingConsumer()
    await service._fetch_failed(consumer, KafkaConnectionError("broker gone"))
    assert consumer.seeks == []
    assert service.skipped == []  # type: ignore[attr-defined]


async def test_an_undecodable_error_from_elsewhere_is_not_swallowed(
    service: TickcastService,
) -> None:
    with pytest.raises(UnicodeDecodeError):
        await service._fetch_failed(
            SeekingConsumer(), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "not from a fetch")
        )


async def test_the_lag_loop_survives_a_partition_taken_while_it_reads(
    service: TickcastService,
) -> None:
    """aiokafka's highwater() asserts the partition is assigned; a rebalance during the
    loop's await used to end the loop's task, and with it the daemon."""
    import asyncio

    class Rebalancing:
        def assignment(self) -> set[TopicPartition]:
            return {P0, P1}

        def highwater(self, tp: TopicPartition) -> int:
            assert tp == P1, "partition no longer assigned"
            return 50

        async def position(self, tp: TopicPartition) -> int:
            return 40

    service._consumer = Rebalancing()
    task = asyncio.create_task(service._lag_loop())
    await asyncio.sleep(1.3)
    assert not task.done()
    task.cancel()
    lag = service.metrics.registry.get_sample_value(
        "tickcast_consumer_lag_records", {"partition": "1"}
    )
    assert lag == 10
