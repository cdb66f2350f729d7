"""Rebuilding windows from the input topic when partitions are assigned.

Windows live in memory, so a new owner of a partition (after a start, a crash or a
rebalance) must rebuild them before it scores that partition's next tick. Records below
the group's committed offset were already scored and dead-lettered by the previous owner;
here they only roll windows forward. A separate consumer outside the group reads them, so
the group consumer's own position (the committed offset) is never disturbed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from daemon.ticks import decode_ticks
from daemon.windows import SymbolWindows

logger = logging.getLogger(__name__)


async def restore_windows(
    windows: SymbolWindows,
    until: dict[TopicPartition, int],
    *,
    bootstrap_servers: str,
    max_tick_bytes: int,
    max_symbol_length: int,
    consumer_kwargs: dict[str, Any] | None = None,
    fetch_max_records: int = 20_000,
) -> int:
    """Replay each partition from its beginning up to ``until[tp]`` into ``windows``.

    Returns the number of records replayed. All partitions are read concurrently by one
    consumer, so a long partition does not hold up the others' fetches.
    """
    todo = {tp: end for tp, end in until.items() if end > 0}
    if not todo:
        return 0
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=8 * 1024 * 1024,
        **(consumer_kwargs or {}),
    )
    await consumer.start()
    replayed = 0
    started = time.monotonic()
    try:
        consumer.assign(list(todo))
        await consumer.seek_to_beginning(*todo)
        # Partitions whose retained log starts at or after the end have nothing to replay.
        for tp in list(todo):
            if await consumer.position(tp) >= todo[tp]:
                del todo[tp]
        while todo:
            fetched = await consumer.getmany(*todo, timeout_ms=500, max_records=fetch_max_records)
            records = []
            for tp, batch in fetched.items():
                end = todo.get(tp)
                if end is None:
                    continue
                keep = [r for r in batch if r.offset < end]
                records.extend(keep)
                if (keep and keep[-1].offset >= end - 1) or len(keep) < len(batch):
                    del todo[tp]
            if records:
                decoded, _ = decode_ticks(
                    records, max_tick_bytes=max_tick_bytes, max_symbol_length=max_symbol_length
                )
                slots = windows.slots_for(decoded.symbols, decoded.partitions)
                windows.apply(slots, decoded.prices, decoded.ts)
                replayed += len(records)
            for tp in list(todo):
                # Compaction or deletion can leave no record at end - 1: stop at the position.
                if await consumer.position(tp) >= todo[tp]:
                    del todo[tp]
    finally:
        await consumer.stop()
    logger.info(
        "restored windows of %d partitions from %d records in %.2fs",
        len(until),
        replayed,
        time.monotonic() - started,
    )
    return replayed
