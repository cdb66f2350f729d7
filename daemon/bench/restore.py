"""Benchmark: how long a new owner takes to restore windows after an assignment.

Sets up what a long-running deployment leaves behind: an input topic holding
``symbols x ticks_per_symbol`` real-price ticks, all below the group's committed offset, and
the compacted state topic with each symbol's window snapshot (marker ``tail`` ticks per
symbol before the end, so the replay phase is exercised too). The state is computed with
the daemon's own :class:`SymbolWindows` and snapshot encoder, not by running the daemon
over millions of ticks. Then a daemon joins the group and the time from subscription to
"ready" (every partition restored) is measured, and restored windows are checked against
the offline ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from daemon.embedded_kafka import create_topics
from daemon.metrics import DaemonMetrics
from daemon.publisher import BatchPublisher, OutRecord
from daemon.service import TickcastService
from daemon.settings import Settings
from daemon.state_store import encode_marker, encode_snapshot
from daemon.ticks import encode_ticks, tick_prefix
from daemon.windows import SymbolWindows
from model.data import load_many

logger = logging.getLogger(__name__)

REAL_SERIES = [
    "dataset:nasdaq",
    "dataset:sp500",
    "dataset:goog",
    "dataset:eurusd",
    "dataset:btcusd",
]


def real_price_paths(n_symbols: int, n_ticks: int) -> np.ndarray:
    """[n_symbols, n_ticks] real prices: symbol i walks series i % 5 from its own start."""
    series = [s.prices for s in load_many(REAL_SERIES)]
    paths = np.empty((n_symbols, n_ticks))
    for i in range(n_symbols):
        prices = series[i % len(series)]
        if len(prices) >= n_ticks:
            start = (i * 7919) % (len(prices) - n_ticks + 1)
            paths[i] = prices[start : start + n_ticks]
        else:  # a short series (BTCUSD monthly) is repeated end to end
            paths[i] = np.resize(prices, n_ticks)
    return paths


def _window(windows: SymbolWindows, symbol: str) -> np.ndarray:
    found = windows.window(symbol)
    return found if found is not None else np.empty(0)


async def measure_restore(
    bootstrap: str,
    checkpoint_dir: Path,
    *,
    symbols: int = 10_000,
    ticks_per_symbol: int = 1_000,
    partitions: int = 4,
    tail: int = 5,
    window_length: int = 60,
) -> dict[str, Any]:
    """Build the backlog, then time a fresh daemon's restore. Returns the figures."""
    run = uuid4().hex[:8]
    topics = {
        "input": f"restore-ticks-{run}",
        "output": f"restore-predictions-{run}",
        "dlq": f"restore-dlq-{run}",
        "state": f"restore-state-{run}",
    }
    await create_topics(bootstrap, [topics["input"], topics["output"], topics["dlq"]], partitions)
    await create_topics(bootstrap, [topics["state"]], partitions, {"cleanup.policy": "compact"})
    group = f"restore-bench-{run}"

    names = np.array([f"SYM{i:06d}" for i in range(symbols)], dtype=object)
    paths = real_price_paths(symbols, ticks_per_symbol)
    base_ts = 1_600_000_000_000
    setup_started = time.monotonic()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks=1,
        linger_ms=20,
        max_batch_size=1024 * 1024,
    )
    await producer.start()
    publisher = BatchPublisher(producer)
    await producer.client._wait_on_metadata(topics["input"])
    parts = sorted(producer.client.cluster.partitions_for_topic(topics["input"]))
    partition_of = np.array(
        [publisher.partition_for(topics["input"], n.encode(), parts) for n in names.tolist()]
    )
    # Tick k of every symbol, then tick k + 1: symbols interleave as on a live feed.
    offsets_end = dict.fromkeys(range(partitions), 0)
    windows = SymbolWindows(window_length, initial_capacity=symbols)
    snapshot_at = ticks_per_symbol - tail
    keys = [n.encode() for n in names.tolist()]
    prefixes = [tick_prefix(n) for n in names.tolist()]
    try:
        for k in range(ticks_per_symbol):
            ts = base_ts + k * 1000
            values = encode_ticks(prefixes, paths[:, k], [ts] * len(prefixes))
            by_partition: dict[int, list[OutRecord]] = {}
            for key, value, p in zip(keys, values, partition_of.tolist(), strict=True):
                by_partition.setdefault(p, []).append((key, value, []))
            deliveries = []
            for p, records in by_partition.items():
                deliveries += await publisher.send_to_partition(topics["input"], p, records)
                offsets_end[p] += len(records)
            await asyncio.gather(*(d.future for d in deliveries))
            if k < snapshot_at:
                slots = windows.slots_for(names.tolist(), partition_of.astype(np.int32))
                windows.apply(slots, paths[:, k].copy(), np.full(symbols, ts, np.int64))
        # Snapshot as of tick `snapshot_at` of every symbol: offset symbols * snapshot_at per
        # partition share, exactly where those ticks end in each partition.
        per_partition = np.bincount(partition_of, minlength=partitions)
        marker = {p: int(per_partition[p]) * snapshot_at for p in range(partitions)}
        snapshot = windows.take_snapshot(marker).snapshot
        for p in range(partitions):
            mask = snapshot.partitions == p
            records = encode_snapshot(
                type(snapshot)(
                    symbols=[s for s, m in zip(snapshot.symbols, mask.tolist(), strict=True) if m],
                    partitions=snapshot.partitions[mask],
                    prices=snapshot.prices[mask],
                    count=snapshot.count[mask],
                    last_ts=snapshot.last_ts[mask],
                    offsets=snapshot.offsets[mask],
                )
            )
            deliveries = await publisher.send_to_partition(topics["state"], p, records)
            deliveries += await publisher.send_to_partition(
                topics["state"], p, [encode_marker(marker[p], window_length)]
            )
            await asyncio.gather(*(d.future for d in deliveries))
    finally:
        await producer.stop()
    # The previous owner had scored everything: commit the end offsets for the group.
    committer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await committer.start()
    committer.assign([TopicPartition(topics["input"], p) for p in offsets_end])
    try:
        await committer.commit(
            {TopicPartition(topics["input"], p): o for p, o in offsets_end.items()}
        )
    finally:
        await committer.stop()
    setup_seconds = time.monotonic() - setup_started

    settings = Settings(
        bootstrap_servers=bootstrap,
        input_topic=topics["input"],
        output_topic=topics["output"],
        dlq_topic=topics["dlq"],
        state_topic=topics["state"],
        group_id=group,
        checkpoint_dir=checkpoint_dir,
        metrics_port=0,
        device="cpu",
    )
    metrics = DaemonMetrics(CollectorRegistry(), process=False)
    service = TickcastService(settings, metrics)
    await service.startup()
    started = time.monotonic()
    task = asyncio.create_task(service.main_loop())
    while not all(service.readiness().values()):
        await asyncio.sleep(0.01)
        if time.monotonic() - started > 600:
            raise TimeoutError("restore did not finish in 10 minutes")
    ready_seconds = time.monotonic() - started
    registry = metrics.registry
    restore_seconds = registry.get_sample_value("tickcast_restore_seconds_sum") or 0.0
    loaded = registry.get_sample_value("tickcast_restored_snapshots_total") or 0.0
    replayed = registry.get_sample_value("tickcast_restored_ticks_total") or 0.0
    # Windows as the full history leaves them (offline), for a sample of symbols.
    for k in range(snapshot_at, ticks_per_symbol):
        slots = windows.slots_for(names.tolist(), partition_of.astype(np.int32))
        windows.apply(slots, paths[:, k].copy(), np.full(symbols, base_ts + k * 1000, np.int64))
    sample = names[:: max(1, symbols // 200)].tolist()
    exact = all(np.array_equal(_window(service.windows, s), _window(windows, s)) for s in sample)
    service.handle_exit()
    await task
    await service.shutdown()
    return {
        "symbols": symbols,
        "ticks_per_symbol": ticks_per_symbol,
        "records_behind_committed_offset": int(sum(offsets_end.values())),
        "partitions": partitions,
        "snapshots_loaded": int(loaded),
        "records_replayed": int(replayed),
        "restore_seconds": round(restore_seconds, 3),
        "subscribe_to_ready_seconds": round(ready_seconds, 3),
        "restored_windows_exact": exact,
        "setup_seconds": round(setup_seconds, 1),
    }
