"""The daemon's lifecycle and its pipeline: ingest -> score -> publish -> acknowledge.

Four asyncio tasks joined by FIFO queues, so every prediction of a symbol leaves in tick
order and offsets are committed strictly in order:

* ingest: ``getmany`` micro-batches -> decode -> roll windows -> :class:`Chunk`
* score: gather ready windows into one batch (size or delay, as Triton's dynamic batcher
  does) and submit its forward pass to the inference thread
* publish: take each batch's predictions, in order, and hand them to the producer; the
  next batch is assembled and running while this one is published
* acknowledge: wait for the broker's acks, then commit the input offsets they cover

Lifecycle in the manner of uvicorn: :meth:`TickcastService.serve` = ``startup()``,
``main_loop()``, ``shutdown()``; SIGTERM and SIGINT only set ``should_exit``, and a
SIGINT once it is set (a second Ctrl-C) forces the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    ProducerFenced,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)
from aiokafka.structs import TopicPartition

from daemon import raw_records
from daemon.batching import PendingWindows
from daemon.clients import (
    make_consumer,
    make_producer,
    state_transactional_id,
    stop_client,
    transactional_id,
)
from daemon.http import HealthServer
from daemon.inference import (
    inference_workers,
    load_serving_predictor,
    lower_thread_priority,
    timed_predict,
)
from daemon.metrics import DaemonMetrics, observe_many, summarize_many
from daemon.model_watcher import ModelWatcher
from daemon.pipeline import Chunk, Dispatched, ScoringRows, commit_offsets
from daemon.predictor import Predictor
from daemon.publisher import BatchPublisher, Delivery, OutRecord, SendProgress
from daemon.records import dead_letter_record, prediction_records
from daemon.restore import restore_windows
from daemon.retries import call_with_retries
from daemon.settings import Settings
from daemon.state_store import (
    FencedStateProducers,
    PendingSnapshot,
    SharedStateProducer,
    StateProducers,
    StateWriter,
)
from daemon.ticks import BadTick, RawRecord, UnreadableRecord, decode_ticks
from daemon.windows import SymbolWindows, group_starts

logger = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
COMMIT_ATTEMPTS = 5
# At shutdown, how long cancelled helpers (a snapshot round aborting) may take to end.
HELPERS_STOP_S = 2.0
# Send errors no retry can fix: the daemon stops (exit 1) and says why, rather than retry
# forever with every partition blocked behind the send. Others (an outage, a missing
# topic, a leader moving) are retried until they pass: ticks are never dropped.
PERMANENT_SEND_ERRORS: tuple[type[KafkaError], ...] = (
    TopicAuthorizationFailedError,
    ClusterAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    InvalidTopicError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)
GIL_SWITCH_INTERVAL_S = 1e-4


@dataclass
class ScoredBatch:
    """A batch whose forward pass was submitted; ``inference`` resolves to its output."""

    rows: ScoringRows
    completed: list[Chunk]
    version: str
    inference: asyncio.Future[tuple[np.ndarray, float]] | None


class PartitionsMovedError(RuntimeError):
    """Exactly-once: a batch's input partitions were revoked before it was committed."""


class SendRefusedError(RuntimeError):
    """The broker refuses a send for a reason no retry can fix (PERMANENT_SEND_ERRORS)."""


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, service: TickcastService) -> None:
        self._service = service

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._service.on_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self._service.on_assigned(list(assigned))


class TickcastService:
    """One daemon instance: a consumer-group member that scores and publishes ticks."""

    def __init__(
        self,
        settings: Settings,
        metrics: DaemonMetrics | None = None,
        predictor: Predictor | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or DaemonMetrics()
        self.predictor = predictor or load_serving_predictor(settings)
        self.windows = SymbolWindows(self.predictor.window_length)
        self.should_exit = asyncio.Event()
        self.force_exit = False
        self.failed = False  # a pipeline task died: exit non-zero so a supervisor restarts
        self.started = False
        self._stopping = False
        self.inference_workers = inference_workers(
            settings, self.predictor.device, compiled=self.predictor.compile is not None
        )
        self._inference = ThreadPoolExecutor(
            max_workers=self.inference_workers,
            thread_name_prefix="tickcast-infer",
            initializer=lower_thread_priority,
            initargs=(settings.inference_nice,),
        )
        self._pending_predictor: Predictor | None = None
        self._state_topic: str | None = None
        self._state_producer: AIOKafkaProducer | None = None  # unfenced: the one writer
        self._state_producers: StateProducers | None = None
        self._state_writer: StateWriter | None = None
        self._last_snapshot = time.monotonic()
        self._last_round: PendingSnapshot | None = None  # until it is settled
        self._snapshot_backlog = False  # the last round was written and left symbols behind
        self._last_commit_ok = True  # commits are cumulative: the latest one decides
        # Acknowledged offsets of this assignment whose commit failed: every later commit
        # carries them, so "committed" always means everything acknowledged so far.
        self._uncommitted: dict[TopicPartition, int] = {}
        self._failed_read: tuple[TopicPartition, int] | None = None  # read once more
        # Per input partition: the offset after the last record rolled into the windows.
        self._positions: dict[TopicPartition, int] = {}
        self._assignment = 0  # rebalances so far (Chunk.assignment)
        self._transactional = settings.delivery == "exactly_once"

        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._publisher: BatchPublisher | None = None
        self._chunks: asyncio.Queue[Chunk | None] = asyncio.Queue()
        # Batches between submission and publication: one per inference worker (at least
        # two), so while they run the previous one is published and the next assembled.
        self._scored: asyncio.Queue[ScoredBatch | None] = asyncio.Queue(
            maxsize=max(2, self.inference_workers)
        )
        self._busy_workers = 0  # batches submitted and not yet scored
        self._caught_up = True  # the last fetch was not full: no backlog behind it
        self._worker_idle = asyncio.Event()
        self._dispatched: asyncio.Queue[Dispatched | None] = asyncio.Queue()
        self._inflight_chunks = 0
        self._inflight_windows = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._resume = asyncio.Event()
        self._resume.set()
        self._low_water = 0
        # Records of partitions whose windows are not restored yet are parked here and
        # released, in order, once they are. on_assigned pauses new partitions at once, so
        # this is a safeguard: aiokafka awaits between taking an assignment and calling
        # the listener, and a fetch completing then could hand some over.
        self._ready_partitions: set[TopicPartition] = set()
        self._parked: dict[TopicPartition, list[RawRecord]] = {}
        # Partitions paused while a background task rebuilds their windows (see on_assigned).
        self._restoring: set[TopicPartition] = set()
        self._restore_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._reported: set[asyncio.Task[Any]] = set()  # failed tasks already logged
        self._http = HealthServer(self, settings.metrics_host, settings.metrics_port)
        self._watcher = ModelWatcher(self, settings.checkpoint_dir, settings.checkpoint_poll_s)
        self._set_model_metrics()
        for topic in (settings.output_topic, settings.dlq_topic):
            self.metrics.send_retries.labels(topic)  # at 0, so the first retry shows in rate()

    # ------------------------------------------------------------------ lifecycle
    @property
    def metrics_port(self) -> int | None:
        """The port /metrics, /healthz and /readyz are served on, once bound (with
        TICKCAST_METRICS_PORT=0 the system picks it)."""
        return self._http.bound_port

    async def serve(self) -> None:
        with self.capture_signals():
            await self.startup()
            try:
                if not self.should_exit.is_set():  # SIGTERM during start-up: just stop
                    await self.main_loop()
            finally:
                await self.shutdown()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        installed = []
        for sig in HANDLED_SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.handle_exit, sig)
                installed.append(sig)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self._watcher.check_now)
            installed.append(signal.SIGHUP)
        try:
            yield
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    def handle_exit(self, sig: int | None = None) -> None:
        if self.should_exit.is_set() and sig == signal.SIGINT:
            # A second Ctrl-C: the user does not want to wait for a graceful stop.
            self.force_exit = True
            for task in self._tasks:
                task.cancel()
        self.should_exit.set()

    async def startup(self) -> None:
        s = self.settings
        await self._http.start()
        transactional = self._transactional
        self._producer = make_producer(
            s,
            "producer",
            # Every send is a whole batch already (send_batch), and aiokafka holds an
            # unfilled batch for linger_ms before it drains it: lingering only delays.
            linger_ms=0,
            max_batch_size=256 * 1024,
            request_timeout_ms=30_000,
            transactional_id=transactional_id(s) if transactional else None,
        )
        self._consumer = make_consumer(s)
        await self._producer.start()
        await self._consumer.start()
        self._publisher = BatchPublisher(self._producer)
        await self._start_state_writer()
        self._consumer.subscribe([s.input_topic], listener=_Rebalance(self))
        # torch and the clients leave ~10^6 long-lived objects; a full collection that
        # scans them all stalls the loop for ~100 ms. Exempt them from future collections.
        gc.collect()
        gc.freeze()
        # The inference thread needs the GIL only to enter and leave each forward call;
        # at the default 5 ms switch interval each of those waits for the event loop to
        # give it up. A short interval hands it over within ~0.1 ms.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.started = True
        logger.info(
            "tickcast serving %s -> %s (model %s on %s, batch<=%d, delay %.1f ms)",
            s.input_topic,
            s.output_topic,
            self.predictor.version,
            self.predictor.device,
            s.max_batch_size,
            s.max_batch_delay_ms,
        )

    async def _start_state_writer(self) -> None:
        """Window snapshots go to the state topic when it exists and fits the input topic."""
        s = self.settings
        consumer = self._consumer
        assert consumer is not None
        if s.snapshot_interval_s <= 0:
            return
        producer = self._producer
        assert producer is not None
        if s.state_topic not in await consumer.topics():
            logger.warning(
                "state topic %s does not exist: no window snapshots; a partition's windows "
                "are restored by replaying it from its beginning",
                s.state_topic,
            )
            return
        state_parts = await producer.partitions_for(s.state_topic)
        input_parts = await producer.partitions_for(s.input_topic)
        if state_parts != input_parts:
            logger.warning(
                "state topic %s has %d partitions, input topic %s has %d: they must be "
                "co-partitioned; no window snapshots",
                s.state_topic,
                len(state_parts),
                s.input_topic,
                len(input_parts),
            )
            return
        tuning: dict[str, Any] = {"linger_ms": 20, "max_batch_size": 1024 * 1024}
        producers: StateProducers
        if s.state_fencing and s.enable_idempotence:
            producers = FencedStateProducers(
                lambda p: make_producer(
                    s, f"state-{p}", transactional_id=state_transactional_id(s, p), **tuning
                ),
                on_drop=self.metrics.state_writers_dropped.inc,
            )
        else:
            self._state_producer = make_producer(s, "state", **tuning)
            await self._state_producer.start()
            producers = SharedStateProducer(BatchPublisher(self._state_producer))
        self._state_producers = producers
        self._state_writer = StateWriter(producers, s.state_topic, self.windows)
        self._state_topic = s.state_topic
        logger.info(
            "window snapshots go to %s (%s)",
            s.state_topic,
            "fenced: a transactional writer per partition"
            if isinstance(producers, FencedStateProducers)
            else "not fenced",
        )

    async def main_loop(self) -> None:
        self._tasks = [
            asyncio.create_task(self._ingest_loop(), name="tickcast-ingest"),
            asyncio.create_task(self._score_loop(), name="tickcast-score"),
            asyncio.create_task(self._publish_loop(), name="tickcast-publish"),
            asyncio.create_task(self._ack_loop(), name="tickcast-ack"),
            asyncio.create_task(self._watcher.run(), name="tickcast-model-watcher"),
            asyncio.create_task(self._lag_loop(), name="tickcast-lag"),
        ]
        if self._state_writer is not None:
            self._tasks.append(
                asyncio.create_task(self._state_writer.run(), name="tickcast-state-writer")
            )
        stop = asyncio.create_task(self.should_exit.wait())
        done, _ = await asyncio.wait([stop, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        self._check_failed(done)

    def _check_failed(self, tasks: Iterable[asyncio.Task[Any]]) -> bool:
        """Log each finished task's failure once and mark the daemon failed (exit 1)."""
        failed = False
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                failed = True
                if task not in self._reported:
                    self._reported.add(task)
                    logger.error(
                        "pipeline task %s failed", task.get_name(), exc_info=task.exception()
                    )
        if failed:
            self.failed = True
            self.should_exit.set()
        return failed

    async def shutdown(self) -> None:
        """Stop fetching, drain what was fetched, commit, leave the group, all within
        SHUTDOWN_TIMEOUT_S: the drain gets the budget but its last part (at most 5 s),
        which is left for the clients to stop."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        budget = self.settings.shutdown_timeout_s
        deadline = loop.time() + budget
        logger.info("shutting down: draining %d in-flight chunks", self._inflight_chunks)
        self._resume.set()
        pipeline, helpers = self._tasks[:4], self._tasks[4:]
        for task in helpers:
            task.cancel()
        await self._cancel_restore()
        clients_share = min(5.0, budget / 4)
        try:
            async with asyncio.timeout_at(deadline - clients_share):
                if helpers:
                    # A snapshot round cut off here ends (its transactions aborted) before
                    # the final rounds use the same writers; a stuck one gets a short wait.
                    await asyncio.wait(helpers, timeout=HELPERS_STOP_S)
                await self._drain(pipeline)
        except TimeoutError:
            logger.warning(
                "draining took over %.1fs; cancelling (uncommitted ticks are redelivered)",
                budget - clients_share,
            )
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Together, by the deadline: stopping the consumer waits for a rebalance callback in
        # progress, and an idempotent producer's flush never gives up while the broker is
        # unreachable.
        clients = [self._consumer, self._producer, self._state_producer]
        left = deadline - loop.time()
        stopping = [stop_client(c, left) for c in clients if c is not None]
        if self._state_producers is not None:
            stopping.append(self._state_producers.stop(left))
        await asyncio.gather(*stopping)
        await self._http.stop()
        self._inference.shutdown(wait=False, cancel_futures=True)
        logger.info("stopped")

    async def _drain(self, pipeline: list[asyncio.Task[None]]) -> None:
        """Let the pipeline finish what was fetched; a task failing meanwhile ends it."""
        if pipeline:
            ingest, *downstream = pipeline
            await asyncio.wait([ingest])
            self._check_failed([ingest])  # what it fetched before failing is still drained
            await self._chunks.put(None)
            done, _ = await asyncio.wait(downstream, return_when=asyncio.FIRST_EXCEPTION)
            if self._check_failed(done):
                return  # the rest would wait for what the failed task never hands on
        if self._state_writer is not None:
            try:
                await self._write_final_snapshots(self._state_writer)
            except Exception as exc:  # the next owner replays from the last marker
                logger.warning("final window snapshots not written (%r)", exc)

    async def _write_final_snapshots(self, writer: StateWriter) -> None:
        """Everything fetched is committed now: the last rounds are exact. Written one
        after another, so each round's copy stays bounded."""
        await writer.flush()
        if not self._last_commit_ok:
            # Their markers would lie above the committed offset, and the next owner would
            # distrust the state topic and replay whole partitions; the markers already
            # written stay valid.
            logger.warning("last offset commit failed: no final window snapshots")
            return
        while (snapshot := self._maybe_snapshot(force=True)) is not None:
            self._write_snapshot(snapshot, committed=True)
            await writer.flush()

    # ------------------------------------------------------------------ readiness
    def readiness(self) -> dict[str, bool]:
        consumer = self._consumer
        producer = self._producer
        return {
            # Always: the service is only ever built with a loaded checkpoint.
            "model_loaded": self.predictor is not None,
            "partitions_assigned": bool(
                consumer is not None
                and consumer.assignment()
                and consumer.assignment() <= self._ready_partitions
            ),
            "producer_connected": bool(
                producer is not None and self.started and not producer._closed
            ),
            "not_stopping": not self._stopping and not self.should_exit.is_set(),
        }

    # ------------------------------------------------------------------ rebalance
    async def on_revoked(self, revoked: list[TopicPartition]) -> None:
        """Finish and commit what was fetched from these partitions, then forget them."""
        # aiokafka's rebalances are eager: everything assigned is revoked, so a restore
        # still running is for partitions that are going away (or coming back re-restored).
        await self._cancel_restore()
        if not revoked:
            return
        try:
            async with asyncio.timeout(self.settings.shutdown_timeout_s):
                await self._drained.wait()
                if self._state_writer is not None and not self._stopping:
                    # These partitions' snapshots must land before the next owner's
                    # restore reads the state topic: one written later could leave it
                    # an older window under a newer marker. (When stopping, the writer no
                    # longer runs: shutdown flushes what is queued itself.)
                    await self._state_writer.wait_idle()
        except TimeoutError:
            logger.warning(
                "revocation: pipeline not drained in time; some ticks will be redelivered"
            )
            if self._state_writer is not None:
                self._state_writer.discard_queued()
                self._state_writer.abandon_current()
        if self._uncommitted and self._consumer is not None:
            # The last moment these partitions' offsets can be committed by this member:
            # what an earlier commit could not, else the next owner is redelivered it.
            await self._commit(self._consumer, self._uncommitted)
        parts = {tp.partition for tp in revoked if tp.topic == self.settings.input_topic}
        if self._state_producers is not None:
            # A write still open here (the drain timed out) is aborted by the next owner.
            await self._state_producers.release(
                parts, timeout_s=min(5.0, self.settings.shutdown_timeout_s)
            )
        for tp in revoked:
            self._ready_partitions.discard(tp)
            self._positions.pop(tp, None)
            self._parked.pop(tp, None)
        dropped = self.windows.drop_partitions(parts)
        if self._inflight_chunks == 0:
            self.windows.recycle_retired()
        for p in parts:
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(str(p))
        self.metrics.symbols_tracked.set(len(self.windows))
        held = self._consumer.assignment() if self._consumer is not None else set()
        self.metrics.assigned_partitions.set(len(set(held) - set(revoked)))
        # Chunks still in flight now belong to an assignment that has ended; what it
        # could not commit is redelivered to the partitions' next owner.
        self._assignment += 1
        self._uncommitted = {}
        self._failed_read = None
        logger.info("partitions revoked: %s (%d symbols dropped)", sorted(parts), dropped)

    async def on_assigned(self, assigned: list[TopicPartition]) -> None:
        """Pause the new partitions and rebuild their windows in the background.

        aiokafka sends no heartbeats while this listener runs, so a restore done here
        (seconds to minutes without the state topic) would outlast the session timeout and
        get the member evicted: a rebalance, another restore, and so on. Instead the
        partitions stay paused until a background task has made their windows exactly
        what an uninterrupted run would have; the member heartbeats meanwhile, and the
        partitions already ready go on being scored. Any record fetched before the
        pause took hold is parked until then (see _build_chunk).
        """
        consumer = self._consumer
        assert consumer is not None
        self.metrics.assigned_partitions.set(len(consumer.assignment()))
        if not assigned:
            return
        consumer.pause(*assigned)
        if self._stopping:
            return  # a rebalance during shutdown: nothing more will be scored here
        self._restoring.update(assigned)
        self.metrics.restoring_partitions.set(len(self._restoring))
        self._restore_task = asyncio.create_task(
            self._restore_in_background(list(assigned)), name="tickcast-restore"
        )

    async def _restore_in_background(self, assigned: list[TopicPartition]) -> None:
        """A failed restore stops the daemon (exit 1): its partitions would stay paused
        for good, and the group gives them to a member that can restore them."""
        try:
            await self._restore_assigned(assigned)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("restoring partitions %s failed; stopping", assigned)
            self.failed = True
            self.should_exit.set()
            return
        consumer = self._consumer
        assert consumer is not None
        self._restoring.difference_update(assigned)
        self.metrics.restoring_partitions.set(len(self._restoring))
        if self._resume.is_set():  # else backpressure resumes them when it lifts
            consumer.resume(*[tp for tp in assigned if tp in consumer.assignment()])

    async def _cancel_restore(self) -> None:
        task, self._restore_task = self._restore_task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # the caller itself is being cancelled, not just the restore
        self._restoring.clear()
        self.metrics.restoring_partitions.set(0)

    async def _restore_assigned(self, assigned: list[TopicPartition]) -> None:
        consumer = self._consumer
        assert consumer is not None
        started = time.monotonic()
        # Up to where fetching will start: the committed offset, or where auto_offset_reset
        # puts a partition without one. (Asking the group for the committed offset again
        # could see a later commit and leave a gap between the windows and the fetch.)
        until = {tp: await consumer.position(tp) for tp in assigned}
        s = self.settings
        if self._state_producers is not None:
            # Fence the partitions' previous writers before reading what they wrote.
            await self._state_producers.acquire(
                tp.partition for tp in assigned if tp.topic == s.input_topic
            )
        stats = await restore_windows(
            self.windows,
            until,
            bootstrap_servers=s.bootstrap_servers,
            max_tick_bytes=s.max_tick_bytes,
            max_symbol_length=s.max_symbol_length,
            state_topic=self._state_topic,
            consumer_kwargs=s.client_kwargs(),
        )
        self._positions.update(until)
        self._ready_partitions.update(assigned)
        self.metrics.restored_ticks.inc(stats.replayed)
        self.metrics.restored_snapshots.inc(stats.snapshots)
        self.metrics.restore_seconds.observe(time.monotonic() - started)
        self.metrics.symbols_tracked.set(len(self.windows))
        logger.info(
            "partitions assigned: %s (windows restored: %d from snapshots, %d ticks replayed)",
            sorted(tp.partition for tp in assigned),
            stats.snapshots,
            stats.replayed,
        )

    # ------------------------------------------------------------------ ingest
    async def _ingest_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        s = self.settings
        max_inflight = s.max_inflight_batches * s.max_batch_size
        while not self.should_exit.is_set():
            if self._inflight_windows > max_inflight:
                await self._pause_until_drained(consumer, max_inflight // 2)
                continue
            assignment = self._assignment
            try:
                fetched = await consumer.getmany(timeout_ms=100, max_records=s.fetch_max_records)
            except (KafkaError, UnicodeDecodeError) as exc:
                await self._fetch_failed(consumer, exc)
                continue
            if self._assignment != assignment:
                # A rebalance ended while these were handed over: the partitions' next
                # assignment fetches them again from the committed offset.
                continue
            self._caught_up = sum(map(len, fetched.values())) < s.fetch_max_records
            chunk = self._build_chunk(fetched) if fetched or self._parked else None
            if chunk is None and (snapshot := self._maybe_snapshot()) is not None:
                # Idle: the snapshot rides an empty chunk, so it is written only once
                # everything fetched before it is committed.
                rows = ScoringRows.empty(self.windows.window_length)
                chunk = Chunk(rows=rows, bad=[], commit={}, snapshot=snapshot)
            if chunk is not None:
                await self._enqueue(chunk)

    async def _enqueue(self, chunk: Chunk) -> None:
        chunk.assignment = self._assignment
        self._inflight_chunks += 1
        # Dead letters count too: a stream of bad ticks must not queue without bound.
        self._inflight_windows += len(chunk.rows) + len(chunk.bad)
        self._drained.clear()
        self.metrics.inflight_windows.set(self._inflight_windows)
        await self._chunks.put(chunk)

    async def _fetch_failed(
        self, consumer: AIOKafkaConsumer, exc: KafkaError | UnicodeDecodeError
    ) -> None:
        """A record batch aiokafka cannot parse fails ``getmany()`` while it hands records
        over, dropping what it had already read, on every partition: all go back to what
        was processed, so nothing is skipped. The batch is read once more (a CRC error can
        be one in transit), then dead-lettered (:meth:`_skip_unreadable`). Any other fetch
        error is retried as it is: aiokafka raises those only when it read nothing, and
        where it moved past a record itself (one too large to fetch), a rewind would bring
        the same error back for good."""
        found = raw_records.unreadable_record(exc)
        if found is None:
            if isinstance(exc, UnicodeDecodeError):
                raise exc
            logger.warning("fetch failed (%s); retrying", exc)
            await asyncio.sleep(0.5)
            return
        self._rewind_to_processed(consumer)
        if isinstance(exc, KafkaError) and self._failed_read != found[:2]:
            self._failed_read = found[:2]
            logger.warning("%s; reading it once more", exc)
        else:
            self._failed_read = None
            await self._skip_unreadable(consumer, exc, found)

    def _rewind_to_processed(self, consumer: AIOKafkaConsumer) -> None:
        """Seek every ready partition back to the offset after its last processed record."""
        for other in consumer.assignment():
            if other in self._parked:
                consumer.seek(other, self._parked[other][-1].offset + 1)
            elif other in self._positions and other in self._ready_partitions:
                consumer.seek(other, self._positions[other])

    async def _skip_unreadable(
        self,
        consumer: AIOKafkaConsumer,
        exc: BaseException,
        found: tuple[TopicPartition, int, int],
    ) -> None:
        """Dead-letter what aiokafka cannot parse (a header name that is not UTF-8, a
        batch whose CRC fails or whose codec is missing: that record and the rest of its
        record batch), then go on after it, losing nothing else.

        The partitions are back at what was processed; the partition at fault is then read
        one record at a time up to the unreadable one. Each unreadable offset becomes a
        dead letter without a value; its tickcast.source points at the original.
        """
        tp, first, end = found
        logger.warning(
            "%s[%d] offsets %d..%d cannot be read (%s); dead-lettering them",
            tp.topic,
            tp.partition,
            first,
            end - 1,
            exc,
        )
        assignment = self._assignment
        before = await raw_records.read_before(
            consumer, tp, first, give_up=lambda: self._assignment != assignment
        )
        if before is None:
            return  # a rebalance took the partition; its next owner meets the record anew
        if (chunk := self._build_chunk({tp: before} if before else {})) is not None:
            await self._enqueue(chunk)
        detail = f"record batch unreadable from offset {first}: {exc}"[:200]
        bad = [
            BadTick(UnreadableRecord(offset), tp.partition, "unreadable", detail)
            for offset in range(first, end)
        ]
        self.metrics.ticks_consumed.inc(len(bad))
        self.metrics.bad_ticks.labels("unreadable").inc(len(bad))
        self._positions[tp] = end
        consumer.seek(tp, end)
        rows = ScoringRows.empty(self.windows.window_length)
        await self._enqueue(Chunk(rows=rows, bad=bad, commit={tp: end}))

    async def _pause_until_drained(self, consumer: AIOKafkaConsumer, low_water: int) -> None:
        """Backpressure: stop fetching while inference is behind, instead of buffering."""
        consumer.pause(*consumer.assignment())
        self.metrics.fetch_paused.set(1)
        self._low_water = low_water
        self._resume.clear()
        try:
            await self._resume.wait()
        finally:
            # The assignment may have changed meanwhile; partitions still being restored
            # stay paused until their windows are ready.
            consumer.resume(*(consumer.assignment() - self._restoring))
            self.metrics.fetch_paused.set(0)

    def _build_chunk(self, fetched: dict[TopicPartition, list[RawRecord]]) -> Chunk | None:
        s = self.settings
        live: list[RawRecord] = []
        live_partitions: list[int] = []
        live_counts: list[int] = []
        commit: dict[TopicPartition, int] = {}
        released = [tp for tp in self._parked if tp in self._ready_partitions]
        if released:
            fetched = dict(fetched)
            for tp in released:
                fetched[tp] = self._parked.pop(tp) + fetched.get(tp, [])
        for tp, records in fetched.items():
            if records and tp not in self._ready_partitions:
                self._parked.setdefault(tp, []).extend(records)
            elif records:
                live.extend(records)
                live_partitions.append(tp.partition)
                live_counts.append(len(records))
                commit[tp] = records[-1].offset + 1
        self.metrics.ticks_consumed.inc(len(live))
        if not live:
            return None
        consumed_at = time.time()
        decoded, bad = decode_ticks(
            live,
            np.repeat(np.asarray(live_partitions, np.int32), live_counts),
            max_tick_bytes=s.max_tick_bytes,
            max_symbol_length=s.max_symbol_length,
        )
        for tick in bad:
            self.metrics.bad_ticks.labels(tick.reason).inc()
        slots = self.windows.slots_for(decoded.symbols, decoded.partitions, decoded.offsets)
        applied = self.windows.apply(slots, decoded.prices, decoded.ts)
        if applied.dropped:
            self.metrics.ticks_dropped.labels("not_newer").inc(applied.dropped)
        self.metrics.symbols_tracked.set(len(self.windows))
        idx = applied.accepted[applied.ready]
        if len(idx) < len(applied.accepted):
            self.metrics.ticks_warming_up.inc(len(applied.accepted) - len(idx))
        rows = ScoringRows(
            windows=applied.windows,
            symbols=np.asarray(decoded.symbols, dtype=object)[idx]
            if len(idx)
            else np.empty(0, object),
            prices=decoded.prices[idx],
            ts=decoded.ts[idx],
            prev_ts=applied.prev_ts[applied.ready],
            slots=applied.slots[applied.ready],
            partitions=decoded.partitions[idx],
            offsets=decoded.offsets[idx],
            consumed_at=np.full(len(idx), consumed_at),
        )
        self._positions.update(commit)
        return Chunk(rows=rows, bad=bad, commit=commit, snapshot=self._maybe_snapshot())

    def _maybe_snapshot(self, force: bool = False) -> PendingSnapshot | None:
        """A round copying changed windows as of this fetch: every SNAPSHOT_INTERVAL_S, and
        as soon as the last round is written if it left changed symbols behind. One round
        at a time, so copies never pile up behind a slow state topic."""
        writer = self._state_writer
        if writer is None:
            return None
        last = self._last_round
        if last is not None:
            if not last.settled:
                if not force:
                    return None
                # Forced (the last rounds at shutdown): a round not settled by now was cut
                # off with its chunk and will never be written.
                writer.give_up(last)
            self._snapshot_backlog = last.written and last.round.unsaved > 0
            self._last_round = None  # its copy of the windows can go
        now = time.monotonic()
        due = (
            self._snapshot_backlog or now - self._last_snapshot >= self.settings.snapshot_interval_s
        )
        if not (force or due):
            return None
        self._last_snapshot = now
        self._snapshot_backlog = False
        offsets = {
            tp.partition: position
            for tp, position in self._positions.items()
            if tp in self._ready_partitions
        }
        pending = writer.take(offsets, self.settings.snapshot_max_symbols)
        self._last_round = pending
        self.metrics.snapshot_unsaved_symbols.set(pending.round.unsaved if pending else 0)
        return pending

    # ------------------------------------------------------------------ score
    async def _score_loop(self) -> None:
        """Form batches and submit them to the inference workers.

        Work-conserving dynamic batching: while every worker is busy, windows keep
        gathering (the batch grows for free); once one is idle, a batch waits at most
        MAX_BATCH_DELAY_MS to fill, and what is pending is split across the idle
        workers, so a burst is scored in parallel rather than by one worker.
        """
        s = self.settings
        delay_s = s.max_batch_delay_ms / 1000.0
        live_limit = min(s.max_batch_size, s.live_batch_size)
        pending = PendingWindows()
        closing = False
        while True:
            if not pending:
                if closing:
                    break
                chunk = await self._chunks.get()
                if chunk is None:
                    break
                pending.add(chunk, time.monotonic())
            deadline = pending.oldest_arrival + delay_s
            limit = live_limit if self._caught_up else s.max_batch_size
            while pending.rows < limit and not closing:
                try:
                    chunk = self._chunks.get_nowait()
                except asyncio.QueueEmpty:
                    if pending.rows == 0:
                        break
                    if self._idle_workers() and time.monotonic() >= deadline:
                        break
                    got = await self._next_chunk_or_idle_worker(deadline)
                    if got is False:
                        continue  # a worker became idle, or the delay passed: re-check
                    chunk = got
                if chunk is None:
                    closing = True
                    break
                pending.add(chunk, time.monotonic())
            share = -(-pending.rows // max(1, self._idle_workers()))  # ceil
            batch_parts, completed = pending.take(
                min(limit, share), whole_chunks=self._transactional
            )
            await self._scored.put(self._submit(batch_parts, completed))
        await self._scored.put(None)

    def _idle_workers(self) -> int:
        # A full batch may be queued behind busy workers: busy can exceed the pool.
        return max(0, self.inference_workers - self._busy_workers)

    async def _next_chunk_or_idle_worker(self, deadline: float) -> Chunk | Literal[False] | None:
        """The next chunk, or False once a worker is idle (or when ``deadline`` passed
        with one idle): the score loop then decides whether to submit."""
        if self._idle_workers():
            timeout = max(deadline - time.monotonic(), 0.0)
            try:
                return await asyncio.wait_for(self._chunks.get(), timeout)
            except TimeoutError:
                return False
        self._worker_idle.clear()
        get = asyncio.ensure_future(self._chunks.get())
        idle = asyncio.ensure_future(self._worker_idle.wait())
        await asyncio.wait({get, idle}, return_when=asyncio.FIRST_COMPLETED)
        idle.cancel()
        if get.done():
            return get.result()
        get.cancel()
        return False

    def _submit(self, parts: list[ScoringRows], completed: list[Chunk]) -> ScoredBatch:
        """Start one batch's forward pass in the inference thread (returns at once)."""
        if self._pending_predictor is not None:
            # Swap between two batches: no batch ever mixes two models.
            self.predictor, self._pending_predictor = self._pending_predictor, None
            self._set_model_metrics()
        predictor = self.predictor
        rows = ScoringRows.concat(parts) if parts else ScoringRows.empty(predictor.window_length)
        if self.settings.conflate and len(rows):
            rows = self._conflate(rows)
        future: asyncio.Future[tuple[np.ndarray, float]] | None = None
        if len(rows):
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._inference, timed_predict, predictor, rows.windows)
            self._busy_workers += 1
            future.add_done_callback(self._on_batch_scored)
        return ScoredBatch(rows, completed, predictor.version, future)

    def _on_batch_scored(self, _: object) -> None:
        self._busy_workers -= 1
        self._worker_idle.set()

    async def _publish_loop(self) -> None:
        while (batch := await self._scored.get()) is not None:
            await self._publish(batch)
        await self._dispatched.put(None)

    async def _publish(self, batch: ScoredBatch) -> None:
        """Hand one scored batch (and its chunks' dead letters) to the producer, in order."""
        rows, completed = batch.rows, batch.completed
        predictions = np.empty(0)
        if batch.inference is not None:
            predictions, seconds = await batch.inference
            self.metrics.inference_seconds.observe(seconds)
            self.metrics.batch_size.observe(len(rows))
            self._record_live_accuracy(rows, predictions)
        records = prediction_records(rows, predictions, batch.version)
        dead = [
            dead_letter_record(b, self.settings.input_topic, self.settings.dlq_max_value_bytes)
            for chunk in completed
            for b in chunk.bad
        ]
        if self._transactional:
            await self._publish_in_transaction(records, dead, completed)
            deliveries = []
        else:
            deliveries = await self._send_with_retry(self.settings.output_topic, records)
            deliveries += await self._send_with_retry(self.settings.dlq_topic, dead)
        await self._dispatched.put(Dispatched(deliveries, rows, completed))

    async def _publish_in_transaction(
        self, records: list[OutRecord], dead: list[OutRecord], completed: list[Chunk]
    ) -> None:
        """Exactly-once: predictions, dead letters and input offsets in one transaction.

        An aborted transaction's records are invisible to read_committed consumers, so on
        a broker error the same records are sent again in a fresh transaction.
        """
        producer, publisher = self._producer, self._publisher
        assert producer is not None and publisher is not None
        offsets = commit_offsets(completed)

        async def transaction() -> None:
            self._refuse_moved(completed)
            try:
                async with producer.transaction():
                    deliveries = await publisher.send(self.settings.output_topic, records)
                    deliveries += await publisher.send(self.settings.dlq_topic, dead)
                    await asyncio.gather(*(d.future for d in deliveries))
                    # A rebalance may have ended while the acks came: raising here aborts.
                    self._refuse_moved(completed)
                    if offsets:
                        await producer.send_offsets_to_transaction(offsets, self.settings.group_id)
            except KafkaError as exc:
                self._retry_or_stop(self.settings.output_topic, exc)
                raise

        await call_with_retries("transaction", self._retriable, transaction)

    def _retriable(self, exc: BaseException) -> bool:
        """Whether a failed send, transaction or commit is tried again. Sends stop on the
        errors no retry fixes before asking (:meth:`_retry_or_stop`)."""
        # ProducerFenced: another instance took over our transactional id; we are the zombie.
        return (
            isinstance(exc, KafkaError)
            and not isinstance(exc, ProducerFenced)
            and not self.force_exit
        )

    def _retry_or_stop(self, topic: str, exc: KafkaError) -> None:
        """Count a failed send to be retried, or raise SendRefusedError when no retry can
        fix it (PERMANENT_SEND_ERRORS)."""
        if not self._retriable(exc):
            return  # the error itself is raised
        if isinstance(exc, PERMANENT_SEND_ERRORS):
            raise SendRefusedError(
                f"sending to {topic} failed for good ({type(exc).__name__}: {exc}); stopping"
            ) from exc
        self.metrics.send_retries.labels(topic).inc()

    def _refuse_moved(self, completed: list[Chunk]) -> None:
        """Exactly-once: raise if these chunks' partitions were revoked since they were
        fetched (the drain timed out), even if assigned here again since.

        Committing their offsets would not be fenced (aiokafka commits without the group
        generation) and the new owner's predictions would repeat these. The daemon stops
        without committing; the new owner predicts these ticks once.
        """
        moved = {
            tp.partition
            for chunk in completed
            for tp in chunk.commit
            if chunk.assignment != self._assignment or tp not in self._ready_partitions
        }
        if moved:
            raise PartitionsMovedError(
                f"partitions {sorted(moved)} moved while their batch was in flight; "
                "stopping without committing it (exactly-once)"
            )

    def _conflate(self, rows: ScoringRows) -> ScoringRows:
        """Keep only each symbol's newest window in this batch (TICKCAST_CONFLATE)."""
        reversed_slots = rows.slots[::-1]
        _, first_from_end = np.unique(reversed_slots, return_index=True)
        keep = np.sort(len(rows) - 1 - first_from_end)
        skipped = len(rows) - len(keep)
        if skipped:
            self.metrics.ticks_conflated.inc(skipped)
            self._inflight_windows -= skipped
            rows = ScoringRows(**{k: getattr(rows, k)[keep] for k in rows.__dataclass_fields__})
        return rows

    def _record_live_accuracy(self, rows: ScoringRows, predictions: np.ndarray) -> None:
        """Score each symbol's previous prediction against the price that just arrived.

        A previous prediction counts only if it was made for the tick right before this one
        (its ts equals this row's prev_ts). Vectorised over the batch, rows of one symbol
        taken in order.
        """
        w = self.windows
        order = np.argsort(rows.slots, kind="stable")
        slots = rows.slots[order]
        sorted_predictions, sorted_ts = predictions[order], rows.ts[order]
        first = group_starts(slots)  # a symbol's first row: its previous prediction is stored
        prev_pred = np.empty(len(slots))
        prev_pred[1:] = sorted_predictions[:-1]
        prev_pred[first] = w.last_prediction[slots[first]]
        prev_pred_ts = np.empty(len(slots), np.int64)
        prev_pred_ts[1:] = sorted_ts[:-1]
        prev_pred_ts[first] = w.last_prediction_ts[slots[first]]
        valid = (prev_pred_ts == rows.prev_ts[order]) & np.isfinite(prev_pred)
        actual = rows.prices[order][valid]
        if len(actual):
            last_price = rows.windows[order[valid], -2]
            gru = np.abs(actual - prev_pred[valid])
            naive = np.abs(actual - last_price)
            for forecaster, errors in (("gru", gru), ("naive", naive)):
                summarize_many(self.metrics.live_abs_error.labels(forecaster), errors)
        last_of_slot = np.empty(len(slots), bool)
        last_of_slot[:-1] = first[1:]
        last_of_slot[-1] = True
        w.last_prediction[slots[last_of_slot]] = sorted_predictions[last_of_slot]
        w.last_prediction_ts[slots[last_of_slot]] = sorted_ts[last_of_slot]

    async def _send_with_retry(self, topic: str, records: list[OutRecord]) -> list[Delivery]:
        publisher = self._publisher
        assert publisher is not None
        progress = SendProgress()  # a retry sends only what the failed try did not hand over

        async def send() -> list[Delivery]:
            try:
                return await publisher.send(topic, records, progress)
            except KafkaError as exc:
                self._retry_or_stop(topic, exc)
                raise

        return await call_with_retries(f"send to {topic}", self._retriable, send)

    # ------------------------------------------------------------------ acknowledge
    async def _ack_loop(self) -> None:
        """Wait for acks in order; commit what they complete at most every
        COMMIT_INTERVAL_MS, one commit for all batches acknowledged since the last.

        A commit is a request to the group coordinator; one per batch would make the
        broker, not inference, the bottleneck when batches are small and frequent. Offsets
        are never committed before their predictions are acknowledged, so the interval
        only bounds how much a crash redelivers.
        """
        consumer = self._consumer
        assert consumer is not None and self._publisher is not None
        interval = 0.0 if self._transactional else self.settings.commit_interval_ms / 1000.0
        acknowledged: list[Chunk] = []  # acknowledged, not yet committed
        last_commit = time.monotonic()
        closing = False
        while not closing:
            wait = max(0.0, last_commit + interval - time.monotonic()) if acknowledged else None
            for item in await self._next_dispatched(wait):
                if item is None:
                    closing = True
                    break
                await self._await_deliveries(item)
                self._count_acknowledged(item)
                acknowledged.extend(item.completed)
            # At the end, offsets whose commit failed earlier get one more try too.
            if (acknowledged or (closing and self._uncommitted)) and (
                closing or time.monotonic() - last_commit >= interval
            ):
                await self._commit_acknowledged(consumer, acknowledged)
                acknowledged = []
                last_commit = time.monotonic()
            self.metrics.inflight_windows.set(self._inflight_windows)
            if not self._resume.is_set() and self._inflight_windows <= self._low_water:
                self._resume.set()

    async def _next_dispatched(self, wait: float | None) -> list[Dispatched | None]:
        """Everything dispatched so far (waiting up to ``wait`` s for the first; [] then)."""
        try:
            first = await asyncio.wait_for(self._dispatched.get(), wait)
        except TimeoutError:
            return []
        items = [first]
        while first is not None and not self._dispatched.empty():
            items.append(item := self._dispatched.get_nowait())
            if item is None:
                break
        return items

    async def _commit_acknowledged(self, consumer: AIOKafkaConsumer, chunks: list[Chunk]) -> None:
        if self._transactional:
            committed = True  # inside each batch's transaction
        else:
            # A snapshot round's marker must not lie above the committed offset, so a
            # failed commit is retried by the next one, even by an idle round's (no
            # offsets of its own) or one that covers other partitions only.
            assignment = self._assignment
            offsets = {**self._uncommitted, **commit_offsets(chunks)}
            committed = await self._commit(consumer, offsets)
            if committed:
                self._uncommitted = {}
            elif assignment == self._assignment:  # else on_revoked dropped them meanwhile
                held = consumer.assignment()
                self._uncommitted = {tp: o for tp, o in offsets.items() if tp in held}
            self._last_commit_ok = committed
        for chunk in chunks:
            if chunk.snapshot is not None:
                # A round from an ended assignment (its revocation's drain timed out) could
                # land after the partitions' next owner wrote newer snapshots.
                current = chunk.assignment == self._assignment
                self._write_snapshot(chunk.snapshot, committed and current)
        self._inflight_chunks -= len(chunks)
        if self._inflight_chunks == 0:
            self._drained.set()
            self.windows.recycle_retired()

    def _count_acknowledged(self, item: Dispatched) -> None:
        now = time.time()
        n = len(item.rows)
        if n:
            self.metrics.predictions_published.inc(n)
            observe_many(self.metrics.end_to_end_seconds, now - item.rows.consumed_at)
            observe_many(
                self.metrics.event_time_lag_seconds,
                np.maximum(now - item.rows.ts / 1000.0, 0.0),
            )
        dead = sum(len(c.bad) for c in item.completed)
        if dead:
            self.metrics.dead_letters.inc(dead)
        self._inflight_windows -= n + dead

    async def _await_deliveries(self, item: Dispatched) -> None:
        """Wait for every delivery's ack; on a broker outage, send the records of the failed
        ones again (after a backoff, in order) until they are acknowledged."""
        publisher = self._publisher
        assert publisher is not None
        waiting = list(item.deliveries)  # sent, not yet acknowledged
        failed: list[Delivery] = []  # to send again
        resent: list[Delivery] = []  # what the resend of failed[0] handed over so far

        async def settle() -> None:
            """One try: resend what failed (in order), then wait for every ack. A try that
            fails leaves its progress in ``waiting``, ``failed`` and ``resent`` for the next."""
            nonlocal waiting, resent
            while failed:
                try:
                    waiting.extend(await publisher.resend(failed[0], resent))
                except KafkaError as exc:
                    self._retry_or_stop(failed[0].topic, exc)
                    raise
                failed.pop(0)
                resent = []
            errors: list[KafkaError] = []
            for delivery in waiting:
                try:
                    await delivery.future
                except KafkaError as exc:
                    self._retry_or_stop(delivery.topic, exc)
                    logger.warning(
                        "delivery to %s[%d] failed: %s", delivery.topic, delivery.partition, exc
                    )
                    failed.append(delivery)
                    errors.append(exc)
            waiting = []
            if errors:
                raise errors[0]

        await call_with_retries("delivery", self._retriable, settle)

    def _write_snapshot(self, pending: PendingSnapshot, committed: bool) -> None:
        """A round goes out only once its offsets are committed: never ahead of them."""
        if self._state_writer is None:
            return
        if committed:
            self._state_writer.submit(pending)
            self.metrics.snapshot_symbols.inc(len(pending.snapshot))
        else:
            self._state_writer.give_up(pending)  # its symbols go into a later round

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> bool:
        """Commit ``offsets``; False when that did not happen: nothing is committed once
        any of their partitions was revoked (counted as ``revoked``), or after
        COMMIT_ATTEMPTS failed tries (``failed``)."""
        commits = self.metrics.offset_commits
        assigned = consumer.assignment()
        mine = {tp: o for tp, o in offsets.items() if tp in assigned}
        if len(mine) < len(offsets):
            commits.labels(result="revoked").inc()
            return False
        if not mine:
            return True
        # A few tries only: a later commit covers these offsets too, and redelivery is the
        # worst case of giving up.
        try:
            await call_with_retries(
                "commit", self._retriable, consumer.commit, mine, attempts=COMMIT_ATTEMPTS
            )
        except KafkaError as exc:
            logger.warning(
                "commit failed %d times; the next one retries it: %s", COMMIT_ATTEMPTS, exc
            )
            commits.labels(result="failed").inc()
            return False
        commits.labels(result="committed").inc()
        return True

    # ------------------------------------------------------------------ misc
    async def _lag_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            await asyncio.sleep(1.0)
            self._set_model_age()
            for tp in consumer.assignment():
                # A rebalance can take tp while position() waits (an offset reset), and
                # highwater() asserts the partition is still assigned: skip it then.
                with contextlib.suppress(Exception):
                    high = consumer.highwater(tp)
                    if high is None:
                        continue
                    position = await consumer.position(tp)
                    self.metrics.consumer_lag.labels(str(tp.partition)).set(max(high - position, 0))

    def request_swap(self, predictor: Predictor) -> None:
        """Serve ``predictor`` from the next batch on (called by the model watcher)."""
        self._pending_predictor = predictor

    def _set_model_metrics(self) -> None:
        self.metrics.model_info.info(
            {"version": self.predictor.version, "device": str(self.predictor.device)}
        )
        self._set_model_age()

    def _set_model_age(self) -> None:
        created = self.predictor.checkpoint.meta.created_at_epoch()
        self.metrics.model_age_seconds.set(max(time.time() - created, 0.0))
