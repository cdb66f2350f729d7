"""The daemon's retry policy (daemon.retries, on tenacity) and the calls that use it:
resending failed deliveries and committing offsets. Fakes stand in for the clients; the
backoff's sleeps are recorded instead of slept."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAuthorizationFailedError
from aiokafka.structs import TopicPartition

import daemon.retries
from daemon.pipeline import Dispatched, ScoringRows
from daemon.publisher import BatchPublisher, Delivery, OutRecord
from daemon.retries import BACKOFF_S, call_with_retries
from daemon.service import COMMIT_ATTEMPTS, SendRefusedError, TickcastService
from tests.support.producers import FlakyProducer, per_partition
from tests.unit.conftest import ServiceFactory


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays the backoff asked for, in order; nothing actually waits."""
    asked: list[float] = []
    real_sleep = asyncio.sleep

    async def record(delay: float, *args: Any) -> None:
        asked.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", record)
    return asked


@pytest.fixture
def service(service_factory: ServiceFactory) -> TickcastService:
    return service_factory()


class FailsTimes:
    """An async call that raises ``error`` its first ``times`` calls, then returns 'ok'."""

    def __init__(self, times: int, error: Exception) -> None:
        self.times, self.error, self.calls = times, error, 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.times:
            raise self.error
        return "ok"


def is_kafka_error(exc: BaseException) -> bool:
    return isinstance(exc, KafkaError)


async def test_the_backoff_steps_up_then_stays_at_its_last_delay(sleeps: list[float]) -> None:
    call = FailsTimes(7, KafkaConnectionError("down"))
    assert await call_with_retries("send", is_kafka_error, call) == "ok"
    assert call.calls == 8
    assert sleeps == [*BACKOFF_S, BACKOFF_S[-1], BACKOFF_S[-1]]


async def test_an_error_not_worth_a_retry_is_raised_at_once(sleeps: list[float]) -> None:
    call = FailsTimes(5, ValueError("a bug, not an outage"))
    with pytest.raises(ValueError, match="a bug"):
        await call_with_retries("send", is_kafka_error, call)
    assert call.calls == 1 and sleeps == []


async def test_a_bounded_policy_raises_the_last_error_after_its_attempts(
    sleeps: list[float],
) -> None:
    call = FailsTimes(10, KafkaConnectionError("still down"))
    with pytest.raises(KafkaConnectionError, match="still down"):
        await call_with_retries("commit", is_kafka_error, call, attempts=3)
    assert call.calls == 3 and sleeps == list(BACKOFF_S[:2])


async def test_a_first_try_that_works_never_builds_a_policy(
    monkeypatch: pytest.MonkeyPatch, sleeps: list[float]
) -> None:
    """The hot path: tenacity's bookkeeping (~23 µs a call) only once a try failed."""

    def no_policy(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("built a retry policy for a call that worked")

    monkeypatch.setattr(daemon.retries, "AsyncRetrying", no_policy)
    assert await call_with_retries("send", is_kafka_error, FailsTimes(0, KafkaError())) == "ok"
    with pytest.raises(AssertionError, match="built a retry policy"):
        await call_with_retries("send", is_kafka_error, FailsTimes(1, KafkaError()))
    assert sleeps == [BACKOFF_S[0]]


def delivery(topic: str, partition: int, outcome: Exception | None) -> Delivery:
    future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    if outcome is None:
        future.set_result(None)
    else:
        future.set_exception(outcome)
    return Delivery(topic, partition, [(b"k", f"{topic}-{partition}".encode(), [])], future)


class Resender:
    """A publisher whose resends fail ``refusals`` times, then are acknowledged."""

    def __init__(self, refusals: int = 0, error: Exception | None = None) -> None:
        self.refusals = refusals
        self.error = error or KafkaConnectionError("broker gone")
        self.resent: list[tuple[str, int]] = []

    async def resend(self, failed: Delivery, handed: list[Delivery]) -> list[Delivery]:
        if self.refusals:
            self.refusals -= 1
            raise self.error
        self.resent.append((failed.topic, failed.partition))
        handed.append(delivery(failed.topic, failed.partition, None))
        return handed


def dispatched(*deliveries: Delivery) -> Dispatched:
    return Dispatched(list(deliveries), ScoringRows.empty(60))


async def test_failed_deliveries_are_sent_again_in_order_until_acknowledged(
    service: TickcastService, sleeps: list[float]
) -> None:
    publisher = Resender(refusals=2)
    service._publisher = publisher  # type: ignore[assignment]
    down = KafkaConnectionError("broker gone")
    item = dispatched(
        delivery("predictions", 0, down),
        delivery("predictions", 1, None),
        delivery("ticks.dlq", 0, down),
    )
    await asyncio.wait_for(service._await_deliveries(item), timeout=10)
    assert publisher.resent == [("predictions", 0), ("ticks.dlq", 0)]
    # One backoff after the failed acks, one after each refused resend.
    assert sleeps == list(BACKOFF_S[:3])
    retries = service.metrics.registry.get_sample_value
    assert retries("tickcast_send_retries_total", {"topic": "predictions"}) == 3
    assert retries("tickcast_send_retries_total", {"topic": "ticks.dlq"}) == 1


async def test_a_delivery_refused_for_good_stops_the_daemon(
    service: TickcastService, sleeps: list[float]
) -> None:
    service._publisher = Resender()  # type: ignore[assignment]
    item = dispatched(delivery("predictions", 0, TopicAuthorizationFailedError()))
    with pytest.raises(SendRefusedError, match="predictions failed for good"):
        await service._await_deliveries(item)
    assert sleeps == []


async def test_a_resend_cut_off_partway_goes_on_from_where_it_stopped(
    service: TickcastService, sleeps: list[float]
) -> None:
    """The real publisher over a producer that refuses the resend's second batch: the next
    try hands over only the rest, so every record reaches the producer once, in order."""
    producer = FlakyProducer([0], fail_at=2, capacity=2)
    service._publisher = BatchPublisher(producer)
    sent: list[OutRecord] = [(f"key-{i}".encode(), b"v", []) for i in range(5)]
    future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    future.set_exception(KafkaConnectionError("broker gone"))
    await asyncio.wait_for(
        service._await_deliveries(dispatched(Delivery("predictions", 0, sent, future))),
        timeout=10,
    )
    assert per_partition(producer.handed) == {0: [key for key, _, _ in sent]}
    assert sleeps == list(BACKOFF_S[:2])  # after the failed ack, after the cut-off resend


class FlakyConsumer:
    def __init__(self, failures: int) -> None:
        self.failures, self.committed = failures, 0
        self.partition = TopicPartition("ticks", 0)

    def assignment(self) -> set[TopicPartition]:
        return {self.partition}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.failures:
            self.failures -= 1
            raise KafkaConnectionError("coordinator gone")
        self.committed += 1


@pytest.mark.parametrize(("failures", "committed"), [(COMMIT_ATTEMPTS - 1, True), (99, False)])
async def test_a_commit_is_tried_a_few_times_then_given_up(
    service: TickcastService, sleeps: list[float], failures: int, committed: bool
) -> None:
    consumer = FlakyConsumer(failures)
    offsets = {consumer.partition: 10}
    assert await service._commit(consumer, offsets) is committed
    assert consumer.committed == int(committed)
    assert len(sleeps) == COMMIT_ATTEMPTS - 1
    result = "committed" if committed else "failed"
    count = service.metrics.registry.get_sample_value(
        "tickcast_offset_commits_total", {"result": result}
    )
    assert count == 1
