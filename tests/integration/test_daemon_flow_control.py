"""Backpressure, start-up without a checkpoint, and signals."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from daemon.predictor import Predictor
from model.data import load_series
from tests.support.daemon import consume, daemon_settings, produce, running_daemon, tick_records

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


def test_serve_without_a_checkpoint_names_retrain_and_exits_non_zero(tmp_path):
    env = {**os.environ, "TICKCAST_CHECKPOINT_DIR": str(tmp_path / "empty")}
    done = subprocess.run(
        [sys.executable, "-m", "daemon"], env=env, capture_output=True, text=True, timeout=120
    )
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
    started = time.monotonic()
    code = await asyncio.to_thread(daemon.terminate, 30, signal.SIGINT)
    assert code == 0
    assert time.monotonic() - started < settings.shutdown_timeout_s + 5
    assert "stopped" in (tmp_path / "d.log").read_text()


async def committed_offsets(bootstrap: str, group: str, topic: str) -> int:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic)


async def test_acknowledged_offsets_are_committed_on_the_interval_while_idle(
    kafka_bootstrap, daemon_topics, checkpoint_dir, unique_group
):
    """Commits are batched by COMMIT_INTERVAL_MS, and the last ones do not wait for traffic."""
    settings = daemon_settings(
        kafka_bootstrap, daemon_topics, checkpoint_dir, unique_group,
        max_batch_size=32, commit_interval_ms=300,
    )  # fmt: skip
    series = load_series("dataset:nasdaq")[0]
    n = 400
    records = tick_records(["NDX"] * n, series.prices[-n:].tolist(), series.ts[-n:].tolist())
    async with running_daemon(settings):
        await produce(kafka_bootstrap, daemon_topics["input"], records)
        predictions = await consume(kafka_bootstrap, daemon_topics["output"], n - 59)
        # No more ticks arrive: the pending commit must still happen within the interval.
        deadline = time.monotonic() + 5
        committed = 0
        while time.monotonic() < deadline:
            committed = await committed_offsets(
                kafka_bootstrap, unique_group, daemon_topics["input"]
            )
            if committed == n:
                break
            await asyncio.sleep(0.1)
    assert len(predictions) == n - 59
    assert committed == n
