"""Rebuilding windows when partitions are assigned (start, restart, rebalance).

Windows live in memory, so a new owner of a partition must rebuild them before it scores
that partition's next tick. Records below the group's committed offset were already scored
and dead-lettered by the previous owner; here they only roll windows forward. With a state
topic, each symbol's latest snapshot is loaded first and the input is replayed only from the
partition's snapshot marker; without one, from the beginning of the partition. A separate
consumer outside the group does the reading, so the group consumer's position is untouched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from daemon import raw_records
from daemon.state_store import decode_partition_state
from daemon.ticks import decode_ticks
from daemon.windows import SymbolWindows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestoreStats:
    snapshots: int  # symbols loaded from the state topic
    replayed: int  # input records replayed into windows
    seconds: float


async def _read_to_end(
    consumer: AIOKafkaConsumer,
    start: dict[TopicPartition, int | None],
    end: dict[TopicPartition, int],
    max_records: int,
    passed_over: set[TopicPartition] | None = None,
) -> Any:
    """Yield record lists of each partition from ``start`` (None: beginning) below ``end``.

    Records aiokafka cannot parse (see :func:`raw_records.unreadable_record`) are passed
    over, and their partitions added to ``passed_over``: in the input, the daemon that met
    them live dead-lettered them, and they never reached a window.
    """
    todo = {tp: stop for tp, stop in end.items() if stop > 0}
    from_beginning = [tp for tp in todo if start.get(tp) is None]
    if from_beginning:
        await consumer.seek_to_beginning(*from_beginning)
    for tp in todo:
        offset = start.get(tp)
        if offset is not None:
            consumer.seek(tp, offset)
    # Where each partition's next yielded record starts: a failed fetch returns here.
    resume_at = {tp: await consumer.position(tp) for tp in todo}
    for tp in list(todo):
        if resume_at[tp] >= todo[tp]:
            del todo[tp]
    failed_read: tuple[TopicPartition, int] | None = None  # read once more, as live
    while todo:
        skip: tuple[TopicPartition, int] | None = None  # (partition, offset to go on from)
        try:
            fetched = await consumer.getmany(*todo, timeout_ms=500, max_records=max_records)
        except (UnicodeDecodeError, KafkaError) as exc:
            found = raw_records.unreadable_record(exc)
            if found is None or found[0] not in todo:
                raise
            bad_tp, first, after = found
            for tp in todo:  # the failed fetch dropped what it had read, everywhere
                consumer.seek(tp, resume_at[tp])
            if isinstance(exc, KafkaError) and failed_read != (bad_tp, first):
                failed_read = (bad_tp, first)  # a CRC error can be one in transit
                continue
            failed_read = None
            if passed_over is not None:
                passed_over.add(bad_tp)
            before = await raw_records.read_before(consumer, bad_tp, first)
            fetched = {bad_tp: before} if before else {}
            logger.warning(
                "restore: %s[%d] offsets %d..%d cannot be read; passed over",
                bad_tp.topic,
                bad_tp.partition,
                first,
                after - 1,
            )
            skip = (bad_tp, after)
        for tp, batch in fetched.items():
            stop = todo.get(tp)
            if stop is None:
                continue
            keep = [r for r in batch if r.offset < stop]
            if keep:
                resume_at[tp] = keep[-1].offset + 1
                yield tp, keep
            if len(keep) < len(batch) or (keep and keep[-1].offset >= stop - 1):
                del todo[tp]
        if skip is not None and skip[0] in todo:
            consumer.seek(*skip)
            resume_at[skip[0]] = skip[1]
        for tp in list(todo):
            # Compaction or deletion can leave no record at stop - 1: go by the position.
            if await consumer.position(tp) >= todo[tp]:
                del todo[tp]


def fold_state_records(
    records: list[Any], values: dict[bytes, bytes], written_at: dict[bytes, int]
) -> None:
    """Read state records (in log order) into the latest value and offset of each key, as
    compaction will leave them: a tombstone (no value) deletes its key."""
    for r in records:
        if not r.key:
            continue
        if r.value:
            values[r.key], written_at[r.key] = r.value, r.offset
        else:
            values.pop(r.key, None)
            written_at.pop(r.key, None)


async def restore_windows(
    windows: SymbolWindows,
    until: dict[TopicPartition, int],
    *,
    bootstrap_servers: str,
    max_tick_bytes: int,
    max_symbol_length: int,
    state_topic: str | None = None,
    consumer_kwargs: dict[str, Any] | None = None,
    fetch_max_records: int = 50_000,
) -> RestoreStats:
    """Restore the windows of every symbol in ``until``'s partitions up to those offsets.

    All partitions are read concurrently by one consumer, so a long partition does not
    hold up the others' fetches.
    """
    started = time.monotonic()
    todo = {tp: end for tp, end in until.items() if end > 0}
    if not todo:
        return RestoreStats(0, 0, 0.0)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",  # a marker below the log start: read what is left
        isolation_level="read_committed",
        max_partition_fetch_bytes=16 * 1024 * 1024,
        value_deserializer=raw_records.raw_value,  # offsets, keys and values are all it reads
        **(consumer_kwargs or {}),
    )
    loaded = replayed = 0
    replay_from: dict[TopicPartition, int | None] = dict.fromkeys(todo)
    try:
        await consumer.start()  # inside: a restore cancelled while starting stops it too
        if state_topic:
            state_tps = {TopicPartition(state_topic, tp.partition): tp for tp in todo}
            consumer.assign(list(state_tps))
            ends = await consumer.end_offsets(list(state_tps))
            latest: dict[TopicPartition, dict[bytes, bytes]] = {tp: {} for tp in state_tps}
            written_at: dict[TopicPartition, dict[bytes, int]] = {tp: {} for tp in state_tps}
            damaged: set[TopicPartition] = set()
            async for stp, records in _read_to_end(
                consumer, {}, ends, fetch_max_records, passed_over=damaged
            ):
                fold_state_records(records, latest[stp], written_at[stp])
            for stp, values in latest.items():
                input_tp = state_tps[stp]
                state = decode_partition_state(
                    values, input_tp.partition, windows.window_length, written_at[stp]
                )
                if stp in damaged:
                    # A batch of it could not be read (a disk fault): a snapshot in it
                    # may be missing or older than the marker counts on.
                    state.unusable += 1
                end = todo[input_tp]
                if (
                    state.marker is None
                    or state.marker > end
                    or (state.snapshot.offsets > end).any()
                ):
                    # No marker, or state ahead of the committed offset (offsets were reset
                    # by hand): the snapshots cannot be trusted; replay from the beginning.
                    continue
                if state.unusable:
                    # Snapshots of another window length (the checkpoint changed it) or
                    # damaged: the marker counts on windows that cannot be loaded. The
                    # replay marks every window changed, so the next rounds heal the topic.
                    logger.warning(
                        "%s[%d]: %d snapshot(s) of another window length or damaged; "
                        "replaying the partition from its beginning",
                        stp.topic,
                        stp.partition,
                        state.unusable,
                    )
                    continue
                if state.stale:
                    logger.info(
                        "%s[%d]: %d snapshot(s) of another window length ignored (symbols "
                        "that have not ticked since it changed)",
                        stp.topic,
                        stp.partition,
                        state.stale,
                    )
                windows.load(state.snapshot)
                loaded += len(state.snapshot)
                replay_from[input_tp] = state.marker
        consumer.assign(list(todo))
        async for tp, records in _read_to_end(consumer, replay_from, todo, fetch_max_records):
            decoded, _ = decode_ticks(
                records,
                np.full(len(records), tp.partition, np.int32),
                max_tick_bytes=max_tick_bytes,
                max_symbol_length=max_symbol_length,
            )
            slots = windows.slots_for(decoded.symbols, decoded.partitions, decoded.offsets)
            windows.apply(slots, decoded.prices, decoded.ts)
            replayed += len(records)
    finally:
        await consumer.stop()
    stats = RestoreStats(loaded, replayed, time.monotonic() - started)
    logger.info(
        "restored windows of %d partitions: %d symbols from snapshots, %d records replayed, %.2fs",
        len(todo),
        stats.snapshots,
        stats.replayed,
        stats.seconds,
    )
    return stats
