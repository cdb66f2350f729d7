"""Fetched records as aiokafka parsed them, without building a ``ConsumerRecord`` each.

For every fetched record aiokafka builds a ``ConsumerRecord`` (eleven fields) and a tuple
of its headers: 1.35 us per record, measured on 4,000-record fetches on the 2-core VM the
benchmarks run on, the largest per-tick cost left on the daemon's event loop. A consumer
made with ``value_deserializer=raw_value`` instead receives the record objects aiokafka
parsed the fetch into (0.45 us per record).
They have the ``offset``, ``timestamp``, ``key``, ``value`` and ``headers`` of a
``ConsumerRecord``, but no ``topic`` or ``partition``: ``getmany()`` already keys each list
by its TopicPartition.

This overrides a private method of aiokafka (``PartitionRecords._consumer_record``), so
it is installed only on the aiokafka versions whose fetcher it was read against; on any
other version such a consumer gets ordinary ``ConsumerRecord``\\ s, which have the same
attributes, and works as before. Consumers made without ``raw_value`` are unaffected.
Importing this module installs the override, so passing ``raw_value`` is all a consumer
needs to do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import aiokafka
from aiokafka import AIOKafkaConsumer
from aiokafka.consumer import fetcher
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

logger = logging.getLogger(__name__)

# Versions whose PartitionRecords._consumer_record(tp, record) was read: 0.11.0 to 0.14.0.
SUPPORTED_AIOKAFKA = ((0, 11), (0, 15))


def raw_value(value: bytes | None) -> bytes | None:
    """The value as fetched. As a consumer's ``value_deserializer`` it also selects the
    raw record path (and, where that is not installed, it is an identity)."""
    return value


def unreadable_record(exc: BaseException) -> tuple[Any, int, int] | None:
    """Where a fetch failed to parse: (TopicPartition, first offset not returned, end of
    its record batch), read off the traceback of aiokafka's
    ``PartitionRecords._unpack_records``; None when the error did not come from there.

    aiokafka parses a fetch while it iterates it: a header name that is not UTF-8 (some
    producers, librdkafka's C API for one, send any bytes), a record batch whose CRC
    fails (a damaged disk) or one compressed with a codec this install lacks raises out
    of ``getmany()`` without saying which record it was, and every later fetch of that
    record batch fails at the same place, so none after it in the batch can be read.
    """
    found = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "_unpack_records":
            records, batch = frame.f_locals.get("self"), frame.f_locals.get("next_batch")
            if isinstance(records, fetcher.PartitionRecords) and batch is not None:
                found = (records._tp, records.next_fetch_offset, batch.next_offset)
        tb = tb.tb_next
    return found


async def read_before(
    consumer: AIOKafkaConsumer,
    tp: TopicPartition,
    first: int,
    *,
    give_up: Callable[[], bool] = lambda: False,
    timeout_s: float = 60.0,
) -> list[Any] | None:
    """The records of ``tp`` from its position up to ``first``, the unreadable record
    :func:`unreadable_record` found, fetched one at a time: any larger fetch of that
    record batch fails again. None once ``give_up()`` is true (the partition was taken
    away meanwhile); RuntimeError if ``first`` is not reached within ``timeout_s``."""
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while not give_up() and await consumer.position(tp) < first:
        if time.monotonic() > deadline:
            raise RuntimeError(f"cannot reach offset {first} of {tp}")
        try:
            fetched = await consumer.getmany(tp, timeout_ms=500, max_records=1)
        except (KafkaError, UnicodeDecodeError) as exc:
            found = unreadable_record(exc)
            if found is None or found[:2] != (tp, first):
                raise
            # Nothing readable is left before it: the position stood at a gap (a
            # transaction marker, records compacted away) that the fetch passed over.
            break
        records.extend(r for r in fetched.get(tp, ()) if r.offset < first)
    return None if give_up() else records


def supported(version: str) -> bool:
    """Whether the raw path may be installed on this aiokafka version."""
    major, minor = (
        int("".join(c for c in part if c.isdigit()) or 0) for part in version.split(".")[:2]
    )
    low, high = SUPPORTED_AIOKAFKA
    return low <= (major, minor) < high


def install() -> bool:
    """Route the records of ``raw_value`` consumers around ``ConsumerRecord``; idempotent.
    Returns whether the raw path is in place."""
    records_class: Any = fetcher.PartitionRecords
    if getattr(records_class, "_tickcast_raw", False):
        return True
    if not supported(aiokafka.__version__) or not hasattr(records_class, "_consumer_record"):
        logger.info(
            "aiokafka %s: raw record path not installed, consumers get ConsumerRecords",
            aiokafka.__version__,
        )
        return False
    build_consumer_record = records_class._consumer_record

    def consumer_record(self: Any, tp: Any, record: Any) -> Any:
        if self._value_deserializer is raw_value:
            return record
        return build_consumer_record(self, tp, record)

    records_class._consumer_record = consumer_record
    records_class._tickcast_raw = True
    return True


install()
