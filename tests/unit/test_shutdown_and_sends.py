"""The graceful stop's bounds and exit status, sends the broker refuses, and checkpoint
loads that must not hold up the exit. Fakes stand in for the clients."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from aiokafka.errors import KafkaConnectionError, TopicAuthorizationFailedError

from daemon.model_watcher import in_daemon_thread
from daemon.publisher import OutRecord
from daemon.records import DLQ_MAX_HEADER_BYTES, dead_letter_record
from daemon.service import SendRefusedError, TickcastService
from daemon.ticks import BadTick, UnreadableRecord
from tests.unit.conftest import ServiceFactory


@pytest.fixture
def service(service_factory: ServiceFactory) -> TickcastService:
    return service_factory(shutdown_timeout_s=600)


class HangingClient:
    """A client whose stop() never returns (the broker is gone); records when its stop
    began and when it was given up on, in event-loop time."""

    def __init__(self) -> None:
        self.started_at: float | None = None
        self.cancelled_at: float | None = None

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        self.started_at = loop.time()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled_at = loop.time()
            raise


async def test_a_failure_while_draining_exits_non_zero_without_waiting_out_the_bound(
    service: TickcastService, caplog: pytest.LogCaptureFixture
) -> None:
    """A SIGTERM, then the publish task fails while draining (a fenced producer, say):
    exit 1, not 0; and the ack task, which would wait for what publishing never hands on,
    is not waited for until SHUTDOWN_TIMEOUT_S (600 s here)."""
    never = asyncio.Event()

    async def ingest() -> None:
        return None

    async def score() -> None:
        await service._chunks.get()

    async def publish() -> None:
        raise RuntimeError("fenced while draining")

    async def ack() -> None:
        await never.wait()

    service._tasks = [asyncio.create_task(t()) for t in (ingest, score, publish, ack)]
    service.handle_exit()
    await asyncio.wait_for(service.shutdown(), timeout=60)
    assert service.failed
    assert "pipeline task" in caplog.text and "fenced while draining" in caplog.text
    assert service._tasks[3].cancelled()


async def test_clients_stop_together_within_the_one_deadline(service: TickcastService) -> None:
    """Consumer, producer and state producer stop side by side, each given up on at the
    same deadline: not one full SHUTDOWN_TIMEOUT_S after another."""
    service.settings = service.settings.model_copy(update={"shutdown_timeout_s": 1.0})
    clients = [HangingClient() for _ in range(3)]
    service._consumer, service._producer, service._state_producer = clients
    await asyncio.wait_for(service.shutdown(), timeout=60)
    began = [c.started_at for c in clients]
    given_up = [c.cancelled_at for c in clients]
    assert None not in began and None not in given_up
    assert max(t for t in began if t) < min(t for t in given_up if t), "stopped one by one"


async def test_a_refused_send_stops_the_daemon(service: TickcastService) -> None:
    """Authorization (or a record too large, an invalid topic) is never fixed by a retry:
    instead of every partition waiting behind it forever, the send fails for good."""

    class Refusing:
        async def send(
            self, topic: str, records: list[object], progress: object = None
        ) -> list[object]:
            raise TopicAuthorizationFailedError()

    service._publisher = Refusing()  # type: ignore[assignment]
    with pytest.raises(SendRefusedError, match=r"ticks\.dlq failed for good"):
        await service._send_with_retry("ticks.dlq", [(b"k", b"v", [])])


async def test_an_outage_is_retried_and_counted(service: TickcastService) -> None:
    class FlakyThenFine:
        def __init__(self) -> None:
            self.calls = 0

        async def send(
            self, topic: str, records: list[object], progress: object = None
        ) -> list[str]:
            self.calls += 1
            if self.calls < 3:
                raise KafkaConnectionError("broker gone")
            return ["sent"]

    publisher = FlakyThenFine()
    service._publisher = publisher  # type: ignore[assignment]
    assert await service._send_with_retry("predictions", [(b"k", b"v", [])]) == ["sent"]
    retries = service.metrics.registry.get_sample_value(
        "tickcast_send_retries_total", {"topic": "predictions"}
    )
    assert publisher.calls == 3 and retries == 2


def dead_letter(service: TickcastService, tick: BadTick) -> OutRecord:
    settings = service.settings
    return dead_letter_record(tick, settings.input_topic, settings.dlq_max_value_bytes)


def test_a_dead_letter_drops_headers_that_could_push_it_over_the_limit(
    service: TickcastService,
) -> None:
    big = [(f"h{i}", b"x" * 1024) for i in range(DLQ_MAX_HEADER_BYTES // 1024 + 1)]
    record = UnreadableRecord(offset=7, key=b"K", value=b"{", headers=tuple(big))
    key, value, headers = dead_letter(service, BadTick(record, 0, "not_json", "bad"))
    names = dict(headers)
    assert (key, value) == (b"K", b"{")
    assert names["tickcast.headers_dropped"] == str(len(big)).encode()
    assert "h0" not in names and names["tickcast.reason"] == b"not_json"
    small = UnreadableRecord(offset=8, value=b"{", headers=(("trace", b"1"),))
    _, _, kept = dead_letter(service, BadTick(small, 0, "not_json", "bad"))
    assert ("trace", b"1") in kept and "tickcast.headers_dropped" not in dict(kept)


def test_many_empty_headers_count_their_wire_overhead_too(service: TickcastService) -> None:
    """Names and values alone stay under the cap, but each header also costs its lengths
    on the wire: 30,000 one-byte headers are ~60 KiB more than their contents."""
    many = tuple((f"{i % 10}", b"") for i in range(30_000))
    assert sum(len(k) + len(v) for k, v in many) < DLQ_MAX_HEADER_BYTES
    record = UnreadableRecord(offset=9, value=b"{", headers=many)
    _, _, headers = dead_letter(service, BadTick(record, 0, "not_json", "bad"))
    assert dict(headers)["tickcast.headers_dropped"] == b"30000"


async def test_in_daemon_thread_returns_and_raises_like_the_call() -> None:
    assert await in_daemon_thread(sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        await in_daemon_thread(lambda: 1 / 0)
    names: list[bool] = []
    await in_daemon_thread(lambda: names.append(threading.current_thread().daemon))
    assert names == [True]


async def test_in_daemon_thread_outlives_a_cancelled_wait_quietly() -> None:
    release = threading.Event()
    errors: list[object] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
    waiting = asyncio.create_task(in_daemon_thread(release.wait, 30))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    release.set()
    for _ in range(20):  # let the thread's result reach the loop (and be dropped there)
        await asyncio.sleep(0.01)
    assert errors == []


def test_a_hung_checkpoint_load_does_not_hold_up_the_exit(tmp_path: Path) -> None:
    """asyncio.run waits for its default executor's threads without a bound (Python 3.11),
    so a load stuck on a hung volume through asyncio.to_thread kept a stopped daemon
    alive; a daemon thread does not. The script would take 600 s if it did."""
    script = textwrap.dedent(
        """
        import asyncio, time
        from daemon.model_watcher import in_daemon_thread

        async def main():
            try:
                await asyncio.wait_for(in_daemon_thread(time.sleep, 600), 0.2)
            except TimeoutError:
                print("gave up on the load")

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "gave up on the load" in done.stdout


def test_a_dead_letter_caps_a_huge_key_as_it_caps_the_value(service: TickcastService) -> None:
    """With the key kept whole, a bad record near the broker's limit made a dead letter
    over it: refused for good, the daemon stopped on every restart."""
    limit = service.settings.dlq_max_value_bytes
    record = UnreadableRecord(offset=9, key=b"k" * (limit + 10), value=b"{")
    key, value, headers = dead_letter(service, BadTick(record, 0, "not_json", "bad"))
    assert key == b"k" * limit and value == b"{"
    assert dict(headers)["tickcast.key_bytes"] == str(limit + 10).encode()
