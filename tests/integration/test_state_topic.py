"""Window snapshots in the compacted state topic make restores short and stay exact."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client.parser import text_string_to_metric_families

from daemon.clients import make_producer, state_transactional_id
from daemon.replay import replay
from daemon.state_store import (
    MARKER_KEY,
    decode_marker,
    decode_partition_state,
    encode_marker,
    encode_snapshot,
)
from daemon.windows import WindowSnapshot
from tests.integration.test_daemon_e2e import produce_stream
from tests.integration.test_daemon_recovery import (
    check_complete,
    expected_count,
)
from tests.integration.test_scale_out import long_real_stream
from tests.support.daemon import DaemonProcess, consume, daemon_settings, running_daemon
from tests.support.polling import wait_until

pytestmark = pytest.mark.kafka

PARTITIONS = 3
StateTopic = dict[int, dict[bytes, bytes]]  # partition -> latest value per key


@pytest.fixture
async def state_topics(topic_factory) -> dict[str, str]:
    return {
        "input": await topic_factory(partitions=PARTITIONS, prefix="ticks"),
        "output": await topic_factory(partitions=PARTITIONS, prefix="predictions"),
        "dlq": await topic_factory(partitions=1, prefix="dlq"),
        "state": await topic_factory(
            partitions=PARTITIONS, prefix="state", config={"cleanup.policy": "compact"}
        ),
    }


# Rounds of 2 of the 5 symbols: markers held back by the symbols left for later rounds.
ROUND_SIZES = pytest.mark.parametrize("round_size", [25_000, 2], ids=["one-round", "rounds-of-2"])


def settings_for(kafka_bootstrap, topics, checkpoint_dir, group, round_size=25_000, **extra):
    return daemon_settings(
        kafka_bootstrap,
        topics,
        checkpoint_dir,
        group,
        state_topic=topics["state"],
        snapshot_interval_s=0.1,
        snapshot_max_symbols=round_size,
        **extra,
    )


def markers(state: StateTopic) -> dict[int, int | None]:
    return {p: decode_marker(values.get(MARKER_KEY, b"")) for p, values in state.items()}


def symbol_keys(state: StateTopic) -> set[bytes]:
    return {key for values in state.values() for key in values if key != MARKER_KEY}


async def wait_for_state(
    bootstrap: str, topics: dict[str, str], ready: Callable[[StateTopic], bool], what: str
) -> StateTopic:
    """Follow the state topic's committed records (what a restore reads: snapshot rounds
    are transactions) from its start until ``ready`` holds for what it holds."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    state: StateTopic = {p: {} for p in range(PARTITIONS)}

    async def read_more() -> bool:
        for tp, records in (await consumer.getmany(timeout_ms=200)).items():
            state[tp.partition].update((r.key, r.value) for r in records if r.key and r.value)
        return ready(state)

    await consumer.start()
    try:
        consumer.assign([TopicPartition(topics["state"], p) for p in range(PARTITIONS)])
        await wait_until(read_more, what, interval_s=0)
    finally:
        await consumer.stop()
    return state


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(PARTITIONS)])
    finally:
        await consumer.stop()
    return {tp.partition: end for tp, end in ends.items()}


def scrape(port: int, name: str) -> float | None:
    """One sample of a daemon process's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


async def snapshot_the_head(bootstrap, topics, settings, head):
    """Run a daemon over ``head`` until the state topic covers all 5 symbols with markers
    at the input's ends (the snapshot after the last commit); (ends, state, symbols
    written)."""
    async with running_daemon(settings) as one:
        await produce_stream(bootstrap, topics["input"], head)
        await consume(bootstrap, topics["output"], expected_count(head))
        ends = await end_offsets(bootstrap, topics["input"])
        state = await wait_for_state(
            bootstrap,
            topics,
            lambda state: markers(state) == ends and len(symbol_keys(state)) == 5,
            f"state topic covering all 5 symbols and the input up to {ends}",
        )
        written = one.metrics.registry.get_sample_value("tickcast_snapshot_symbols_total")
    return ends, state, written


async def restart_for_the_tail(bootstrap, topics, settings, stream, tail):
    """Restart over the state topic, then feed ``tail``; (snapshots loaded, records
    replayed, every prediction of ``stream``)."""
    async with running_daemon(settings) as two:
        registry = two.metrics.registry
        loaded = registry.get_sample_value("tickcast_restored_snapshots_total")
        replayed = registry.get_sample_value("tickcast_restored_ticks_total")
        await produce_stream(bootstrap, topics["input"], tail)
        total = expected_count(stream)
        predictions = await consume(bootstrap, topics["output"], total, settle_s=1.0)
    return loaded, replayed, predictions


@ROUND_SIZES
async def test_restart_loads_snapshots_and_replays_only_the_tail(
    kafka_bootstrap, state_topics, checkpoint_dir, unique_group, round_size
):
    stream = long_real_stream()
    first, second = stream.split(int(len(stream) * 0.8))
    settings = settings_for(kafka_bootstrap, state_topics, checkpoint_dir, unique_group, round_size)
    *_, written = await snapshot_the_head(kafka_bootstrap, state_topics, settings, first)
    assert written and written >= 5

    loaded, replayed, predictions = await restart_for_the_tail(
        kafka_bootstrap, state_topics, settings, stream, second
    )
    assert loaded == 5, "every symbol's window comes from its snapshot"
    assert replayed is not None
    assert replayed < len(first) / 4, f"replayed {replayed} of {len(first)} records"
    check_complete(predictions, stream, checkpoint_dir, allow_duplicates=False)


@ROUND_SIZES
async def test_sigkill_with_snapshots_loses_nothing(
    kafka_bootstrap, state_topics, checkpoint_dir, unique_group, tmp_path, round_size
):
    stream = long_real_stream()
    settings = settings_for(kafka_bootstrap, state_topics, checkpoint_dir, unique_group, round_size)
    env_extra = {
        "TICKCAST_STATE_TOPIC": state_topics["state"],
        "TICKCAST_SNAPSHOT_INTERVAL_S": "0.1",
        "TICKCAST_SNAPSHOT_MAX_SYMBOLS": str(round_size),
    }
    daemon = DaemonProcess(settings, tmp_path / "a.log")
    daemon.env.update(env_extra)
    daemon.start()
    await daemon.wait_ready()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        # The tail is sent after the kill: the kill is mid-stream however slow the machine.
        head, tail = stream.split(int(len(stream) * 0.8))
        feeding = asyncio.create_task(replay(producer, state_topics["input"], head, rate=300))
        # Restoring needs a partition's marker, written after its symbols' snapshots.
        await wait_for_state(
            kafka_bootstrap,
            state_topics,
            lambda state: any(
                markers(state)[p] is not None and len(values) > 1 for p, values in state.items()
            ),
            "a partition with window snapshots and their marker",
        )
        daemon.kill()
        await feeding
        await replay(producer, state_topics["input"], tail, rate=300)
    finally:
        await producer.stop()
    again = DaemonProcess(settings, tmp_path / "b.log")
    again.env.update(env_extra)
    again.start()
    await again.wait_ready()
    predictions = await consume(
        kafka_bootstrap, state_topics["output"], expected_count(stream), settle_s=1.0
    )
    loaded = await asyncio.to_thread(scrape, again.port, "tickcast_restored_snapshots_total")
    assert again.terminate() == 0
    assert loaded, "the restart must load windows from the snapshots"
    check_complete(predictions, stream, checkpoint_dir, allow_duplicates=True)


async def committed_state(bootstrap: str, topic: str) -> dict[bytes, bytes]:
    """The latest committed value per key of partition 0, as a restore reads it."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    tp = TopicPartition(topic, 0)
    latest: dict[bytes, bytes] = {}
    await consumer.start()
    try:
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        while await consumer.position(tp) < end:
            for records in (await consumer.getmany(tp, timeout_ms=500)).values():
                latest.update((r.key, r.value) for r in records if r.key and r.value)
    finally:
        await consumer.stop()
    return latest


async def one_partition_topics(topic_factory) -> dict[str, str]:
    return {
        "input": await topic_factory(partitions=1, prefix="ticks"),
        "output": await topic_factory(partitions=1, prefix="predictions"),
        "dlq": await topic_factory(partitions=1, prefix="dlq"),
        "state": await topic_factory(
            partitions=1, prefix="state", config={"cleanup.policy": "compact"}
        ),
    }


@pytest.mark.parametrize("fencing", [True, False], ids=["fenced", "unfenced"])
async def test_a_previous_owners_late_snapshot_write_is_fenced_off(
    kafka_bootstrap, topic_factory, checkpoint_dir, unique_group, fencing
):
    """A previous owner's snapshot write is still open when the daemon takes the partition
    over: its revocation's drain timed out, or it was cut off from the group but not from
    the broker. Its stale window must never land over the daemon's newer ones. Fenced,
    the daemon's writer aborts that write when it takes the partition and the zombie's
    commit fails; unfenced (TICKCAST_STATE_FENCING=false, a documented limit) the stale
    window lands after the daemon's and is what a restore would load."""
    topics = await one_partition_topics(topic_factory)
    settings = settings_for(
        kafka_bootstrap, topics, checkpoint_dir, unique_group, state_fencing=fencing
    )
    stream = long_real_stream()
    symbol = str(stream.symbols[0])
    # The zombie: state partition 0's writer as the previous owner built it, holding a
    # window of an older time under a marker at offset 0, not yet committed.
    zombie = make_producer(
        settings,
        "zombie",
        transactional_id=state_transactional_id(settings, 0),
        transaction_timeout_ms=300_000,  # the broker must not abort it on its own meanwhile
    )
    stale = WindowSnapshot(
        symbols=[symbol],
        partitions=np.zeros(1, np.int32),
        prices=np.ones((1, 60), np.float32),
        count=np.full(1, 60, np.int64),
        last_ts=np.zeros(1, np.int64),
        offsets=np.zeros(1, np.int64),
    )
    ((_, stale_value, _),) = encode_snapshot(stale)
    key = symbol.encode()
    marker = encode_marker(0, 60)[1]

    async def write(value: bytes, key: bytes) -> None:
        await (await zombie.send(topics["state"], value, key=key, partition=0))

    async def finish_the_write() -> None:
        """The rest of the zombie's round, reaching the broker only now, and its commit."""
        await write(stale_value, key)
        await write(marker, MARKER_KEY)
        await zombie.commit_transaction()

    await zombie.start()
    try:
        await zombie.begin_transaction()
        await write(stale_value, key)  # part of the round is on the broker, uncommitted

        async with running_daemon(settings):
            await produce_stream(kafka_bootstrap, topics["input"], stream)
            await consume(kafka_bootstrap, topics["output"], expected_count(stream))
        # Stopped: its final snapshots are written. Now the zombie's write goes on.
        if fencing:
            with pytest.raises(KafkaError):
                await asyncio.wait_for(finish_the_write(), 60)
        else:
            await asyncio.wait_for(finish_the_write(), 60)
    finally:
        await zombie.stop()

    latest = await committed_state(kafka_bootstrap, topics["state"])
    state = decode_partition_state(latest, 0, 60)
    got = dict(zip(state.snapshot.symbols, state.snapshot.prices[:, -1].tolist(), strict=True))
    last_price = float(stream.prices[stream.symbols == symbol][-1])
    if fencing:
        assert latest[key] != stale_value
        assert got[symbol] == pytest.approx(last_price, rel=1e-6), "the daemon's own window"
        assert state.marker == len(stream), "the daemon's marker: the whole input is in"
    else:
        assert latest[key] == stale_value, "unfenced, the late stale window wins"
        assert state.marker == 0


async def test_a_daemon_whose_writer_is_fenced_drops_it_and_keeps_scoring(
    kafka_bootstrap, topic_factory, checkpoint_dir, unique_group
):
    """Another instance initialises partition 0's writer id while the daemon still holds
    the partition (as a new owner would, with this daemon the zombie): aiokafka's writer
    is fenced for real, and the daemon drops it, counts it and goes on predicting."""
    topics = await one_partition_topics(topic_factory)
    settings = settings_for(kafka_bootstrap, topics, checkpoint_dir, unique_group)
    stream = long_real_stream()
    first, second = stream.split(len(stream) // 2)
    async with running_daemon(settings) as daemon:
        registry = daemon.metrics.registry
        await produce_stream(kafka_bootstrap, topics["input"], first)
        await consume(kafka_bootstrap, topics["output"], expected_count(first))
        await wait_until(
            lambda: registry.get_sample_value("tickcast_snapshot_symbols_total"),
            "a first snapshot round",
        )
        usurper = make_producer(
            settings, "usurper", transactional_id=state_transactional_id(settings, 0)
        )
        await usurper.start()  # InitProducerId: the daemon's writer is fenced
        try:
            await produce_stream(kafka_bootstrap, topics["input"], second)
            predictions = await consume(kafka_bootstrap, topics["output"], expected_count(stream))
            await wait_until(
                lambda: registry.get_sample_value("tickcast_state_writers_dropped_total"),
                "the fenced writer to be dropped",
            )
        finally:
            await usurper.stop()
        assert registry.get_sample_value("tickcast_state_writers_dropped_total") == 1
        assert not daemon.failed
    check_complete(predictions, stream, checkpoint_dir, allow_duplicates=False)


async def test_snapshots_of_another_window_length_make_the_restore_replay_everything(
    kafka_bootstrap, state_topics, tmp_path, unique_group, caplog
):
    """A checkpoint with a new window length needs a restart; the state topic then holds
    windows of the old length. The restore must not load none of them yet trust the
    markers (every window would start short, from the marker on): it replays each
    partition from its beginning, and the windows are exact at once."""
    import logging

    from tests.integration.test_daemon_e2e import assert_same_model_output
    from tests.support.daemon import expected_windows, make_checkpoint, reference_predictions

    stream = long_real_stream()
    first, second = stream.split(int(len(stream) * 0.8))
    short, full = tmp_path / "window-30", tmp_path / "window-60"
    make_checkpoint(short, window_length=30)
    version = make_checkpoint(full)
    async with running_daemon(settings_for(kafka_bootstrap, state_topics, short, unique_group)):
        await produce_stream(kafka_bootstrap, state_topics["input"], first)
        ends = await end_offsets(kafka_bootstrap, state_topics["input"])
        await wait_for_state(
            kafka_bootstrap,
            state_topics,
            lambda state: markers(state) == ends and len(symbol_keys(state)) == 5,
            f"30-tick windows of all 5 symbols, markers at {ends}",
        )
    symbols = sorted(set(stream.symbols.tolist()))
    first_run = sum(max(0, int((first.symbols == s).sum()) - 29) for s in symbols)

    settings = settings_for(kafka_bootstrap, state_topics, full, unique_group)
    with caplog.at_level(logging.WARNING, logger="daemon.restore"):
        async with running_daemon(settings) as two:
            registry = two.metrics.registry
            loaded = registry.get_sample_value("tickcast_restored_snapshots_total")
            replayed = registry.get_sample_value("tickcast_restored_ticks_total")
            await produce_stream(kafka_bootstrap, state_topics["input"], second)
            predictions = await consume(
                kafka_bootstrap, state_topics["output"], first_run + len(second), settle_s=0.5
            )
    assert loaded == 0 and replayed == len(first)
    assert "another window length or damaged" in caplog.text
    after = [p for p in predictions if p.model_version == version]
    assert len(after) == len(second)
    for symbol in symbols:
        mask = stream.symbols == symbol
        prices, ts = stream.prices[mask], stream.ts[mask]
        new = int((second.symbols == symbol).sum())
        if not new:
            continue  # the split left this symbol's ticks all in the first part
        got = [p for p in after if p.symbol == symbol]
        assert [p.ts for p in got] == ts[len(ts) - new :].tolist(), symbol  # full windows
        windows = expected_windows(prices, 60)[len(prices) - 59 - new :]
        assert_same_model_output(
            [p.predicted for p in got], reference_predictions(full, windows), windows
        )

    # A 30-tick record written after the 60-tick daemon's marker, as by a 30-tick daemon
    # killed between its records and its marker (unfenced): the marker may count on the
    # window it replaced, so the partition is replayed in full ...
    ends = await end_offsets(kafka_bootstrap, state_topics["input"])
    await wait_for_state(
        kafka_bootstrap,
        state_topics,
        lambda state: (
            markers(state) == ends
            and all(
                len(v) == 512 for values in state.values() for v in values.values() if len(v) > 16
            )
        ),
        f"60-tick windows of every symbol, markers at {ends}",
    )
    ghost = WindowSnapshot(
        symbols=["GHOST"],
        partitions=np.zeros(1, np.int32),
        prices=np.ones((1, 30), np.float64),
        count=np.full(1, 30, np.int64),
        last_ts=np.ones(1, np.int64),
        offsets=np.zeros(1, np.int64),
    )
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        ((key, value, _),) = encode_snapshot(ghost)
        await (await producer.send(state_topics["state"], value, key=key, partition=0))
    finally:
        await producer.stop()

    async def restart() -> tuple[float | None, float | None, str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="daemon.restore"):
            async with running_daemon(settings) as daemon:
                registry = daemon.metrics.registry
                loaded = registry.get_sample_value("tickcast_restored_snapshots_total")
                replayed = registry.get_sample_value("tickcast_restored_ticks_total")
        return loaded, replayed, caplog.text

    loaded, replayed, log = await restart()
    assert f"{state_topics['state']}[0]: 1 snapshot(s) of another window length" in log
    assert "replaying the partition from its beginning" in log
    # ... and that daemon's rounds and marker now follow it: GHOST, a symbol no 60-tick
    # daemon had a window for, is ignored from then on instead of forcing a full replay
    # at every restore.
    loaded, replayed, log = await restart()
    assert loaded == 5 and replayed == 0
    assert "1 snapshot(s) of another window length ignored" in log
    assert "replaying the partition from its beginning" not in log


async def test_a_state_batch_damaged_on_disk_makes_its_partition_a_full_replay(
    kafka_broker, state_topics, checkpoint_dir, unique_group, caplog
):
    """A snapshot batch that no longer matches its CRC cannot be read: the restore must not
    pass over it and trust the marker (the symbol's window would start short, or from an
    older snapshot); that partition is replayed from its beginning, and every prediction
    after the restart is still exact."""
    import logging

    from tests.integration.test_fetch_errors import corrupt_on_disk

    bootstrap = kafka_broker.bootstrap
    stream = long_real_stream()
    first, second = stream.split(int(len(stream) * 0.8))
    settings = settings_for(bootstrap, state_topics, checkpoint_dir, unique_group)
    ends, state, _ = await snapshot_the_head(bootstrap, state_topics, settings, first)
    # Damage the batch holding one symbol's latest snapshot.
    partition, values = next((p, v) for p, v in state.items() if len(v) > 1)
    symbol = next(key for key in values if key != MARKER_KEY)
    corrupt_on_disk(kafka_broker, state_topics["state"], partition, values[symbol])

    with caplog.at_level(logging.WARNING, logger="daemon.restore"):
        loaded, replayed, predictions = await restart_for_the_tail(
            bootstrap, state_topics, settings, stream, second
        )
    assert f"{state_topics['state']}[{partition}]" in caplog.text
    assert "another window length or damaged" in caplog.text
    on_damaged = len(values) - 1  # its symbols come from the replay instead
    assert loaded == 5 - on_damaged
    assert replayed is not None and replayed >= ends[partition]
    check_complete(predictions, stream, checkpoint_dir, allow_duplicates=False)
