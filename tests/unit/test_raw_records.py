"""The raw record path: the same records as aiokafka's ConsumerRecords, without them."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from aiokafka.consumer.fetcher import PartitionRecords
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import ConsumerRecord, TopicPartition

from daemon.raw_records import install, raw_value, supported, unreadable_record
from daemon.ticks import decode_ticks, encode_tick

TP = TopicPartition("ticks", 2)
LIMITS = {"max_tick_bytes": 256, "max_symbol_length": 8}


def fetched_bytes() -> bytes:
    """One record batch as a broker returns it: ticks, a bad value, keys and headers."""
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    values = [encode_tick("QQQ", 312.45, 1_704_205_800_000), b"{not json", encode_tick("A", 2, 7)]
    for offset, value in enumerate(values):
        headers = [("trace", b"%d" % offset)] if offset % 2 else []
        builder.append(
            offset, timestamp=1_704_205_800_000 + offset, key=b"k", value=value, headers=headers
        )
    return bytes(builder.build())


def fetch(value_deserializer: Any) -> list[Any]:
    records = PartitionRecords(
        TP, MemoryRecords(fetched_bytes()), [], 0, None, value_deserializer, False, 0
    )
    return list(records)


def test_raw_consumers_get_the_fetched_records_with_the_same_fields() -> None:
    assert install()
    raw, ordinary = fetch(raw_value), fetch(None)
    assert len(raw) == len(ordinary) == 3
    assert not any(isinstance(r, ConsumerRecord) for r in raw)
    fields = ("offset", "timestamp", "key", "value")
    assert [[getattr(r, f) for f in fields] for r in raw] == [
        [getattr(r, f) for f in fields] for r in ordinary
    ]
    assert [list(r.headers) for r in raw] == [list(r.headers) for r in ordinary]


def test_other_consumers_still_get_consumer_records() -> None:
    install()
    assert install()  # idempotent
    assert all(isinstance(r, ConsumerRecord) for r in fetch(None))
    assert all(isinstance(r, ConsumerRecord) for r in fetch(lambda v: v))


def test_raw_records_decode_like_consumer_records() -> None:
    install()
    partitions = np.full(3, TP.partition, np.int32)
    raw, raw_bad = decode_ticks(fetch(raw_value), partitions, **LIMITS)
    ordinary, ordinary_bad = decode_ticks(fetch(None), partitions, **LIMITS)
    assert raw.symbols == ordinary.symbols == ["QQQ", "A"]
    assert raw.offsets.tolist() == ordinary.offsets.tolist() == [0, 2]
    assert raw.partitions.tolist() == [2, 2]
    assert [(b.record.offset, b.partition, b.reason) for b in raw_bad] == [(1, 2, "not_json")]
    assert [(b.record.value, b.reason) for b in raw_bad] == [
        (b.record.value, b.reason) for b in ordinary_bad
    ]


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("0.11.0", True),
        ("0.14.0", True),
        ("0.14.1.dev0", True),
        ("0.10.2", False),
        ("0.15.0", False),
        ("1.0.0", False),
    ],
)
def test_installed_only_on_the_versions_it_was_read_against(version: str, ok: bool) -> None:
    assert supported(version) is ok


def test_raw_value_is_an_identity_where_the_path_is_not_installed() -> None:
    assert raw_value(b"x") == b"x" and raw_value(None) is None


def test_the_daemon_needs_no_install_call_of_its_own() -> None:
    # A fresh interpreter: importing the service (which imports daemon.raw_records) is
    # enough for its raw_value consumers to take the raw path.
    code = (
        "import daemon.service\n"
        "from aiokafka.consumer import fetcher\n"
        "print(getattr(fetcher.PartitionRecords, '_tickcast_raw', False))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"


def batch_bytes(base_offset: int, compression_type: int = 0) -> bytes:
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=compression_type,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for i in range(3):
        value = encode_tick("QQQ", 312.45 + i, 1_704_205_800_000 + base_offset + i)
        builder.append(i, timestamp=1_704_205_800_000, key=b"QQQ", value=value, headers=[])
    data = bytearray(builder.build())
    data[0:8] = base_offset.to_bytes(8, "big")  # the batch's base offset (outside the CRC)
    return bytes(data)


def read_until_it_fails(data: bytes) -> tuple[list[Any], BaseException]:
    records = PartitionRecords(TP, MemoryRecords(data), [], 0, None, None, True, 0)
    read: list[Any] = []
    try:
        for record in records:
            read.append(record)
    except Exception as exc:  # what the fetch raised, to be located
        return read, exc
    raise AssertionError("the batch was read without an error")


def test_a_batch_damaged_on_disk_is_found_where_the_fetch_failed() -> None:
    from aiokafka.errors import CorruptRecordException

    damaged = bytearray(batch_bytes(3))
    damaged[-5] ^= 0x01  # inside the last record's value: the CRC no longer matches
    read, error = read_until_it_fails(batch_bytes(0) + bytes(damaged) + batch_bytes(6))
    assert [r.offset for r in read] == [0, 1, 2]
    assert isinstance(error, CorruptRecordException)
    assert unreadable_record(error) == (TP, 3, 6)  # that batch, and only it


def test_a_batch_in_a_codec_this_install_lacks_is_found_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aiokafka import codec
    from aiokafka.errors import UnsupportedCodecError

    lz4 = batch_bytes(3, compression_type=3)  # built while lz4 is there
    monkeypatch.setattr(codec, "has_lz4", lambda: False)
    read, error = read_until_it_fails(batch_bytes(0) + lz4)
    assert [r.offset for r in read] == [0, 1, 2]
    assert isinstance(error, UnsupportedCodecError)
    assert unreadable_record(error) == (TP, 3, 6)


def test_the_daemon_reads_every_codec_kafka_has() -> None:
    """lz4, snappy and zstd come with aiokafka's extras (cramjam), which tickcast requires."""
    from aiokafka import codec

    assert codec.has_gzip() and codec.has_snappy() and codec.has_lz4() and codec.has_zstd()
