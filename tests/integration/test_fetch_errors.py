"""Record batches as they come from real producers and real disks: compressed with every
codec Kafka has, and one corrupted on the broker's disk."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from daemon.embedded_kafka import KafkaBroker, create_topics
from model.data import load_series
from tests.support.daemon import (
    consume,
    consume_raw,
    daemon_settings,
    make_checkpoint,
    running_daemon,
    tick_records,
)

pytestmark = pytest.mark.kafka

CODECS = ("gzip", "snappy", "lz4", "zstd")


async def produce_batches(
    bootstrap: str,
    topic: str,
    partition: int,
    batches: list[list[tuple[bytes, bytes]]],
    compression: str | None = None,
    transactional: bool = False,
) -> None:
    """Each list of records as its own record batch (sent, then awaited) on ``partition``;
    ``transactional``: each in its own transaction, so a commit marker follows each."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=50,
        compression_type=compression,
        transactional_id=f"tx-{uuid4().hex[:8]}" if transactional else None,
    )
    await producer.start()
    try:
        for batch in batches:
            async with contextlib.AsyncExitStack() as stack:
                if transactional:
                    await stack.enter_async_context(producer.transaction())
                sent = [
                    await producer.send(topic, value, key=key, partition=partition)
                    for key, value in batch
                ]
                for delivery in sent:
                    await delivery
    finally:
        await producer.stop()


async def test_ticks_compressed_with_every_codec_are_all_predicted(kafka_bootstrap, tmp_path):
    """One partition per codec, real NASDAQ closes under one symbol each: a producer that
    compresses (a common producer default) must not stop the daemon."""
    series = load_series("dataset:nasdaq")[0]
    n = 80
    topics = {k: f"{k}-{uuid4().hex[:8]}" for k in ("input", "output", "dlq")}
    await create_topics(kafka_bootstrap, list(topics.values()), partitions=len(CODECS))
    for partition, codec in enumerate(CODECS):
        start = len(series) - n - 100 * partition  # a different stretch per symbol
        records = tick_records(
            [codec.upper()] * n,
            series.prices[start : start + n].tolist(),
            series.ts[start : start + n].tolist(),
        )
        await produce_batches(kafka_bootstrap, topics["input"], partition, [records], codec)

    make_checkpoint(tmp_path)
    config = daemon_settings(kafka_bootstrap, topics, tmp_path, f"g-{uuid4().hex[:8]}")
    async with running_daemon(config) as service:
        predictions = await consume(
            kafka_bootstrap, topics["output"], len(CODECS) * (n - 59), settle_s=0.5
        )
        registry = service.metrics.registry
    for partition, codec in enumerate(CODECS):
        start = len(series) - n - 100 * partition
        got = [p.ts for p in predictions if p.symbol == codec.upper()]
        assert got == series.ts[start + 59 : start + n].tolist(), codec
    assert registry.get_sample_value("tickcast_dead_letter_records_total") == 0


def corrupt_on_disk(broker: KafkaBroker, topic: str, partition: int, value: bytes) -> None:
    """Flip one byte of ``value`` where the broker's log segment holds it: its record
    batch no longer matches its CRC, as after a disk fault. The broker serves fetches from
    the file, so consumers read the damaged bytes."""
    segment = broker.data_dir / f"{topic}-{partition}" / f"{0:020d}.log"
    data = bytearray(segment.read_bytes())
    at = data.find(value)
    assert at >= 0 and data.find(value, at + 1) < 0, "the value must be in the segment once"
    data[at + len(value) // 2] ^= 0x01
    with Path(segment).open("r+b") as log:
        log.seek(at + len(value) // 2)
        log.write(bytes([data[at + len(value) // 2]]))


@pytest.mark.parametrize("transactional", [False, True], ids=["plain", "transactional"])
async def test_a_batch_corrupted_on_the_brokers_disk_is_dead_lettered_and_nothing_else_lost(
    kafka_broker: KafkaBroker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    transactional: bool,
) -> None:
    """Partition 0 holds three record batches, the middle one damaged on disk; partition 1
    is intact. aiokafka fails a whole fetch on the bad CRC, dropping what it had read from
    the other partition too. The daemon reads it once more, then dead-letters the damaged
    batch's offsets as `unreadable`; every other tick of both partitions is predicted, and
    a restart's restore passes over the batch too. Written in transactions, a commit
    marker sits between the batches: the offset before the damaged one holds no record."""
    bootstrap = kafka_broker.bootstrap
    series = load_series("dataset:nasdaq")[0]
    n, first_bad, end_bad = 100, 65, 70
    a = tick_records(["NDX"] * n, series.prices[-n:].tolist(), series.ts[-n:].tolist())
    b_start = len(series) - 2 * n
    b = tick_records(
        ["NDX2"] * n,
        series.prices[b_start : b_start + n].tolist(),
        series.ts[b_start : b_start + n].tolist(),
    )
    topics = {k: f"{k}-{uuid4().hex[:8]}" for k in ("input", "output", "dlq")}
    await create_topics(bootstrap, list(topics.values()), partitions=2)
    await produce_batches(
        bootstrap,
        topics["input"],
        0,
        [a[:first_bad], a[first_bad:end_bad], a[end_bad:]],
        transactional=transactional,
    )
    await produce_batches(bootstrap, topics["input"], 1, [b])
    corrupt_on_disk(kafka_broker, topics["input"], 0, a[first_bad + 2][1])

    make_checkpoint(tmp_path)
    config = daemon_settings(bootstrap, topics, tmp_path, f"g-{uuid4().hex[:8]}")
    readable = np.array([i for i in range(n) if not first_bad <= i < end_bad])
    with caplog.at_level(logging.WARNING, logger="daemon.service"):
        async with running_daemon(config) as service:
            expected = (len(readable) - 59) + (n - 59)
            predictions = await consume(bootstrap, topics["output"], expected, settle_s=0.5)
            dead = await consume_raw(bootstrap, topics["dlq"], end_bad - first_bad)
            assert all(service.readiness().values()), "daemon must stay alive and ready"
            registry = service.metrics.registry
    assert "reading it once more" in caplog.text

    ts_a = series.ts[-n:]
    assert [p.ts for p in predictions if p.symbol == "NDX"] == ts_a[readable][59:].tolist()
    ts_b = series.ts[b_start : b_start + n]
    assert [p.ts for p in predictions if p.symbol == "NDX2"] == ts_b[59:].tolist()
    assert len(predictions) == expected  # none twice
    shift = 1 if transactional else 0  # the first transaction's commit marker
    bad_offsets = range(first_bad + shift, end_bad + shift)
    sources = [f"{topics['input']}/0/{offset}".encode() for offset in bad_offsets]
    assert [dict(d.headers)["tickcast.source"] for d in dead] == sources
    assert {dict(d.headers)["tickcast.reason"] for d in dead} == {b"unreadable"}
    assert registry.get_sample_value("tickcast_bad_ticks_total", {"reason": "unreadable"}) == (
        end_bad - first_bad
    )
    assert registry.get_sample_value("tickcast_ticks_consumed_total") == 2 * n

    # A restart in the same group replays both partitions (no state topic): the restore
    # meets the damaged batch too and passes over it, as the live daemon did.
    async with running_daemon(config) as restarted:
        replayed = restarted.metrics.registry.get_sample_value("tickcast_restored_ticks_total")
        assert all(restarted.readiness().values())
    assert replayed == len(readable) + n
