"""Backpressure, start-up without a checkpoint, and signals."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from daemon.predictor import Predictor
from model.data import load_series
from tests.support.daemon import consume, daemon_settings, produce, running_daemon, tick_records
from tests.support.polling import wait_until

pytestmark = pytest.mark.kafka


class SlowPredictor(Predictor):
    """A real model that takes 30 ms a batch: inference falls behind the fetches."""

    def predict(self, windows):
        time.sleep(0.03)
        return super().predict(windows)


async def test_fetching_pauses_when_inference_falls_behind(
    kafka_bootstrap, daemon_topics, checkpoint_dir, unique_group
):
    settings = daemon_settings(
        kafka_bootstrap, daemon_topics, checkpoint_dir, unique_group,
        max_batch_size=16, max_inflight_batches=2, fetch_max_records=50,
    )  # fmt: skip
    series = load_series("dataset:sp500")[0]
    n = 1500
    records = tick_records(["SPX"] * n, series.prices[-n:].tolist(), series.ts[-n:].tolist())
    async with running_daemon(settings) as service:
        service.predictor = SlowPredictor(service.predictor.checkpoint, service.predictor.device)
        await produce(kafka_bootstrap, daemon_topics["input"], records)
        peak = 0
        paused_seen = False
        deadline = time.monotonic() + 120
        published = 0.0
        while published < n - 59 and time.monotonic() < deadline:
            peak = max(peak, service._inflight_windows)
            paused = service.metrics.registry.get_sample_value("tickcast_fetch_paused")
            paused_seen = paused_seen or paused == 1
            published = (
                service.metrics.registry.get_sample_value("tickcast_predictions_published_total")
                or 0.0
            )
            await asyncio.sleep(0.005)
    predictions = await consume(kafka_bootstrap, daemon_topics["output"], n - 59)
    assert len(predictions) == n - 59
    assert paused_seen, "fetching never paused although inference was the bottleneck"
    # Bounded: at most the in-flight limit plus one fetch beyond it.
    assert peak <= 2 * 16 + 50, f"{peak} windows in flight"


# The installed console script and the module form start the same daemon.
SERVE_COMMANDS = [
    [str(Path(sys.executable).with_name("tickcast")), "serve"],
    [sys.executable, "-m", "daemon"],
]


@pytest.mark.parametrize("command", SERVE_COMMANDS, ids=["tickcast serve", "python -m daemon"])
def test_serve_without_a_checkpoint_names_retrain_and_exits_non_zero(tmp_path, command):
    env = {**os.environ, "TICKCAST_CHECKPOINT_DIR": str(tmp_path / "empty")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    assert "tickcast retrain" in done.stderr
    assert "no checkpoint" in done.stderr


async def test_sigint_stops_gracefully_and_leaves_the_group(
    kafka_bootstrap, daemon_topics, checkpoint_dir, unique_group, tmp_path
):
    from tests.support.daemon import DaemonProcess

    settings = daemon_settings(kafka_bootstrap, daemon_topics, checkpoint_dir, unique_group)
    daemon = DaemonProcess(settings, tmp_path / "d.log")
    daemon.start()
    await daemon.wait_ready()
    series = load_series("dataset:goog")[0]
    await produce(
        kafka_bootstrap,
        daemon_topics["input"],
        tick_records(["GOOG"] * 80, series.prices[-80:].tolist(), series.ts[-80:].tolist()),
    )
    await consume(kafka_bootstrap, daemon_topics["output"], 21)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        assert await group_state(admin, unique_group) == ("Stable", 1)
        started = time.monotonic()
        code = await asyncio.to_thread(daemon.terminate, 30, signal.SIGINT)
        assert code == 0
        assert time.monotonic() - started < settings.shutdown_timeout_s + 5
        # Left, not expired: a member that just vanishes stays until the session timeout
        # (aiokafka's default, 10 s), longer than this wait.
        await wait_until(
            lambda: is_empty(admin, unique_group), "the group is empty after the stop", timeout_s=5
        )
    finally:
        await admin.close()
    assert "stopped" in (tmp_path / "d.log").read_text()


async def group_state(admin: AIOKafkaAdminClient, group: str) -> tuple[str, int]:
    """The consumer group's state and its number of members."""
    [response] = await admin.describe_consumer_groups([group])
    [(error_code, _, state, _, _, members, *_)] = response.groups
    assert error_code == 0
    return state, len(members)


async def is_empty(admin: AIOKafkaAdminClient, group: str) -> bool:
    return await group_state(admin, group) == ("Empty", 0)


async def committed_offsets(admin: AIOKafkaAdminClient, group: str, topic: str) -> int:
    offsets = await admin.list_consumer_group_offsets(group)
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic)


async def wait_for_commit(
    admin: AIOKafkaAdminClient, group: str, topic: str, offset: int, since: float
) -> tuple[float, float]:
    """When the committed offsets reached ``offset``, as (not before, not after) times.

    Not before ``since`` nor before the last read that did not see it yet; not after the
    read that saw it.
    """
    not_before = since
    deadline = time.monotonic() + 30
    while True:
        asked = time.monotonic()
        if await committed_offsets(admin, group, topic) >= offset:
            return not_before, time.monotonic()
        assert asked < deadline, f"offset {offset} not committed in 30 s"
        not_before = asked
        await asyncio.sleep(0.02)


async def test_acknowledged_offsets_are_committed_on_the_interval_while_idle(
    kafka_bootstrap, daemon_topics, checkpoint_dir, unique_group
):
    """Commits are batched by COMMIT_INTERVAL_MS, and the last ones do not wait for traffic."""
    interval_s = 2.0
    settings = daemon_settings(
        kafka_bootstrap, daemon_topics, checkpoint_dir, unique_group,
        max_batch_size=32, commit_interval_ms=interval_s * 1000,
    )  # fmt: skip
    series = load_series("dataset:nasdaq")[0]
    n = 400
    records = tick_records(["NDX"] * n, series.prices[-n:].tolist(), series.ts[-n:].tolist())
    first, second = records[:200], records[200:]
    topic = daemon_topics["input"]
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        async with running_daemon(settings):
            since = time.monotonic()
            await produce(kafka_bootstrap, topic, first)
            first_after, _ = await wait_for_commit(admin, unique_group, topic, 200, since)
            # Ticks that arrive right after a commit wait for the next one, due an interval
            # later; nothing else arrives, so it must come by itself.
            since = time.monotonic()
            await produce(kafka_bootstrap, topic, second)
            _, second_by = await wait_for_commit(admin, unique_group, topic, n, since)
            predictions = await consume(kafka_bootstrap, daemon_topics["output"], n - 59)
    finally:
        await admin.close()
    assert len(predictions) == n - 59
    # Scored and acknowledged within a fraction of the interval on a normal machine, the
    # second ticks would be committed well before it if commits were not batched.
    assert second_by - first_after >= interval_s, "two commits less than an interval apart"
