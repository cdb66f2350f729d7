"""Garbage interleaved with real ticks: every good tick predicted, every bad one dead-lettered."""

from __future__ import annotations

import asyncio
import math
from uuid import uuid4

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.embedded_kafka import create_topics
from model.data import load_series
from tests.integration.test_daemon_e2e import assert_same_model_output
from tests.support.daemon import (
    consume,
    consume_raw,
    daemon_settings,
    expected_windows,
    make_checkpoint,
    produce,
    reference_predictions,
    running_daemon,
    tick_records,
)

pytestmark = pytest.mark.kafka

MAX_TICK_BYTES = 512


def _json(obj: object) -> bytes:
    return orjson.dumps(obj)


good = {"symbol": "BAD", "price": 1.5, "ts": 1}
int64s = st.integers(-(2**63), 2**63 - 1)
bad_ticks = st.one_of(
    st.just((b"", "empty")),
    st.binary(min_size=1, max_size=40).map(lambda b: (b"\xff\xfe" + b, "not_utf8")),
    st.text(max_size=30).map(lambda t: (("{" + t).encode(), "not_json")),
    # JSON numbers are bounded to 64 bits here: orjson cannot write larger ones.
    st.one_of(st.lists(int64s, max_size=3), int64s, st.text(max_size=5)).map(
        lambda v: (_json(v), "not_object")
    ),
    st.sampled_from(["symbol", "price", "ts"]).map(
        lambda k: (_json({f: v for f, v in good.items() if f != k}), "missing_field")
    ),
    st.sampled_from(["", 5, None, ["A"], "x" * 100, "TAB\tSYM"]).map(
        lambda s: (_json({**good, "symbol": s}), "bad_symbol")
    ),
    st.one_of(
        st.sampled_from([0, -1, "12", True, None, -1e308, [1.0]]),
        st.floats(max_value=0, allow_nan=False, allow_infinity=False),
    ).map(lambda p: (_json({**good, "price": p}), "bad_price")),
    st.sampled_from(["1", 1.5, -5, 0, 10**14, True, None]).map(
        lambda t: (_json({**good, "ts": t}), "bad_ts")
    ),
    st.integers(MAX_TICK_BYTES + 1, 2000).map(
        lambda n: (_json({**good, "pad": "x" * n}), "oversized")
    ),
)


@settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(garbage=st.lists(bad_ticks, min_size=1, max_size=40), seed=st.randoms(use_true_random=False))
def test_garbage_goes_to_dead_letters_and_good_ticks_flow(kafka_bootstrap, tmp_path, garbage, seed):
    asyncio.run(_scenario(kafka_bootstrap, tmp_path / uuid4().hex, garbage, seed))


async def _scenario(bootstrap, root, garbage, rng) -> None:
    series = load_series("dataset:nasdaq")[0]
    n_good = 80
    good_records = tick_records(
        ["NDX"] * n_good, series.prices[-n_good:].tolist(), series.ts[-n_good:].tolist()
    )
    mixed: list[tuple[bytes | None, bytes, str | None]] = [(k, v, None) for k, v in good_records]
    for value, reason in garbage:
        mixed.insert(rng.randrange(len(mixed) + 1), (b"NDX", value, reason))
    topics = {k: f"{k}-{uuid4().hex[:8]}" for k in ("input", "output", "dlq")}
    await create_topics(bootstrap, list(topics.values()), partitions=1)
    make_checkpoint(root)
    config = daemon_settings(
        bootstrap, topics, root, f"g-{uuid4().hex[:8]}", max_tick_bytes=MAX_TICK_BYTES
    )
    async with running_daemon(config) as service:
        await produce(bootstrap, topics["input"], [(k, v) for k, v, _ in mixed])
        predictions = await consume(bootstrap, topics["output"], n_good - 59, settle_s=0.5)
        dead = await consume_raw(bootstrap, topics["dlq"], len(garbage))
        registry = service.metrics.registry
        assert all(service.readiness().values()), "daemon must stay alive and ready"

    assert [p.ts for p in predictions] == series.ts[-(n_good - 59) :].tolist()
    assert all(math.isfinite(p.predicted) for p in predictions)
    expected_dead = [(v, r) for _, v, r in mixed if r is not None]
    assert [(d.value or b"", dict(d.headers)["tickcast.reason"].decode()) for d in dead] == [
        (v, r) for v, r in expected_dead
    ]
    assert all(
        dict(d.headers)["tickcast.source"].startswith(topics["input"].encode()) for d in dead
    )
    for reason in {r for _, r in expected_dead}:
        count = sum(1 for _, r in expected_dead if r == reason)
        assert registry.get_sample_value("tickcast_bad_ticks_total", {"reason": reason}) == count
    assert registry.get_sample_value("tickcast_dead_letter_records_total") == len(garbage)
    assert registry.get_sample_value("tickcast_ticks_consumed_total") == len(mixed)


class NotUtf8Name(str):
    """A header name sent as bytes that are not UTF-8 (librdkafka's C API allows any)."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"\xff\xfe" + str(self).encode()


async def produce_with_unreadable_header(
    bootstrap: str, topic: str, records: list[tuple[bytes, bytes]], bad_at: int, batch_end: int
) -> None:
    """``records`` as two record batches split at ``batch_end``; record ``bad_at`` carries
    a header name that is not UTF-8."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.producer import message_accumulator
    from aiokafka.producer import producer as producer_module
    from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

    # The pure-Python batch builder calls the name's own encode(); the C one would not.
    with pytest.MonkeyPatch.context() as patch:
        for module in (message_accumulator, producer_module):
            patch.setattr(module, "DefaultRecordBatchBuilder", _DefaultRecordBatchBuilderPy)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=50)
        await producer.start()
        try:
            for batch in (range(batch_end), range(batch_end, len(records))):
                sent = [
                    await producer.send(
                        topic,
                        records[i][1],
                        key=records[i][0],
                        headers=[(NotUtf8Name("trace"), b"1")] if i == bad_at else [],
                    )
                    for i in batch
                ]
                await asyncio.gather(*sent)
        finally:
            await producer.stop()


async def test_a_record_the_client_cannot_parse_is_dead_lettered(kafka_bootstrap, tmp_path):
    """aiokafka fails a whole fetch on a header name that is not UTF-8, and every fetch of
    that record batch at that record: it and the rest of its batch become `unreadable`
    dead letters (pointing at the originals), every tick before it and in the next batch
    is predicted, and the daemon keeps running. A restart restores the windows past those
    records (its restore met them too) and predicts the next ticks exactly."""
    series = load_series("dataset:nasdaq")[0]
    n, later, bad_at, batch_end = 100, 10, 65, 70
    prices, ts = series.prices[-(n + later) :], series.ts[-(n + later) :]
    records = tick_records(["NDX"] * (n + later), prices.tolist(), ts.tolist())
    topics = {k: f"{k}-{uuid4().hex[:8]}" for k in ("input", "output", "dlq")}
    await create_topics(kafka_bootstrap, list(topics.values()), partitions=1)
    await produce_with_unreadable_header(
        kafka_bootstrap, topics["input"], records[:n], bad_at, batch_end
    )

    checkpoint_dir = tmp_path / "checkpoints"
    make_checkpoint(checkpoint_dir)
    config = daemon_settings(kafka_bootstrap, topics, checkpoint_dir, f"g-{uuid4().hex[:8]}")
    unreadable = range(bad_at, batch_end)
    readable = np.array([i for i in range(n + later) if i not in unreadable])
    async with running_daemon(config) as service:
        predictions = await consume(
            kafka_bootstrap, topics["output"], n - len(unreadable) - 59, settle_s=0.5
        )
        dead = await consume_raw(kafka_bootstrap, topics["dlq"], len(unreadable))
        assert all(service.readiness().values()), "daemon must stay alive and ready"
        registry = service.metrics.registry

    assert [p.ts for p in predictions] == ts[readable[readable < n]][59:].tolist()
    sources = [f"{topics['input']}/0/{offset}".encode() for offset in unreadable]
    assert [dict(d.headers)["tickcast.source"] for d in dead] == sources
    assert {dict(d.headers)["tickcast.reason"] for d in dead} == {b"unreadable"}
    assert all(d.value in (None, b"") for d in dead)
    unreadable_count = registry.get_sample_value(
        "tickcast_bad_ticks_total", {"reason": "unreadable"}
    )
    assert unreadable_count == len(unreadable)
    assert registry.get_sample_value("tickcast_ticks_consumed_total") == n

    # Restart in the same group (no state topic: the restore replays the partition).
    async with running_daemon(config) as restarted:
        replayed = restarted.metrics.registry.get_sample_value("tickcast_restored_ticks_total")
        await produce(kafka_bootstrap, topics["input"], records[n:])
        after = await consume(
            kafka_bootstrap, topics["output"], len(predictions) + later, settle_s=0.5
        )
    assert replayed == n - len(unreadable)
    new = after[len(predictions) :]
    assert [p.ts for p in new] == ts[n:].tolist()
    windows = expected_windows(prices[readable], 60)[-later:]
    assert_same_model_output(
        [p.predicted for p in new], reference_predictions(checkpoint_dir, windows), windows
    )
