"""The daemon's metrics and health endpoints against what a known run must produce.

One run on the real broker: 3 real series of 100 ticks (so 3 x 41 predictions), 5 bad
ticks of known reasons, then the same 300 ticks again (all dropped as not newer). Every
counter, histogram count and the live-accuracy summary is checked against numbers
computed independently from the input and from the predictions read back.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.integration.test_daemon_e2e import produce_stream, real_stream
from tests.support.daemon import consume_raw, daemon_settings, produce, running_daemon

pytestmark = pytest.mark.kafka

WINDOW = 60
PER_SYMBOL = 100
PREDICTIONS = 3 * (PER_SYMBOL - WINDOW + 1)
BAD_TICKS: list[tuple[bytes | None, bytes]] = [
    (None, b"garbage"),
    (None, b"{not json either"),
    (None, b""),
    (b"X", orjson.dumps({"symbol": "X", "price": -1.0, "ts": 1_700_000_000_000})),
    (b"X", orjson.dumps({"symbol": "X", "ts": 1_700_000_000_000})),
]
BAD_REASONS = {"not_json": 2, "empty": 1, "bad_price": 1, "missing_field": 1}


async def eventually(
    read: Callable[[], float | None], expected: float, what: str, timeout_s: float = 60
) -> None:
    deadline = time.monotonic() + timeout_s
    while (value := read()) != expected:
        assert time.monotonic() < deadline, f"{what}: {value}, expected {expected}"
        await asyncio.sleep(0.05)


def expected_live_errors(predictions: list[dict]) -> dict[str, tuple[float, int]]:
    """(sum, count) of |next price - forecast| for the GRU and naive, from the output."""
    by_symbol: dict[str, list[dict]] = defaultdict(list)
    for p in predictions:
        by_symbol[p["symbol"]].append(p)
    sums = {"gru": 0.0, "naive": 0.0}
    count = 0
    for rows in by_symbol.values():
        rows.sort(key=lambda p: p["ts"])
        for made, realised in itertools.pairwise(rows):
            sums["gru"] += abs(realised["price"] - made["predicted"])
            sums["naive"] += abs(realised["price"] - made["price"])
            count += 1
    return {name: (total, count) for name, total in sums.items()}


async def test_metric_values_of_a_known_run(
    kafka_bootstrap: str,
    daemon_topics: dict[str, str],
    checkpoint_dir: Path,
    unique_group: str,
    tmp_path: Path,
) -> None:
    stream = real_stream(per_symbol=PER_SYMBOL)
    settings = daemon_settings(kafka_bootstrap, daemon_topics, checkpoint_dir, unique_group)
    version = (checkpoint_dir / "LATEST").read_text().strip()
    async with running_daemon(settings) as service:
        registry = service.metrics.registry

        def value(name: str, **labels: str) -> float:
            return registry.get_sample_value(name, labels) or 0.0

        await produce_stream(kafka_bootstrap, daemon_topics["input"], stream)
        await produce(kafka_bootstrap, daemon_topics["input"], BAD_TICKS)
        records = await consume_raw(kafka_bootstrap, daemon_topics["output"], PREDICTIONS)
        predictions = [orjson.loads(r.value) for r in records]
        assert len(predictions) == PREDICTIONS
        await eventually(
            lambda: value("tickcast_predictions_published_total"), PREDICTIONS, "published"
        )
        await eventually(lambda: value("tickcast_dead_letter_records_total"), 5, "dead letters")
        first_pass_consumed = len(stream) + len(BAD_TICKS)
        await eventually(
            lambda: value("tickcast_ticks_consumed_total"), first_pass_consumed, "consumed"
        )

        # The same ticks again: a redelivery, every one dropped as not newer.
        await produce_stream(kafka_bootstrap, daemon_topics["input"], stream)
        await eventually(
            lambda: value("tickcast_ticks_dropped_total", reason="not_newer"),
            len(stream),
            "dropped",
        )
        await eventually(
            lambda: value("tickcast_ticks_consumed_total"),
            first_pass_consumed + len(stream),
            "consumed",
        )
        for p in range(3):  # the lag loop samples once a second; None until it has
            lag_labels = {"partition": str(p)}
            await eventually(
                partial(registry.get_sample_value, "tickcast_consumer_lag_records", lag_labels),
                0,
                f"lag of partition {p}",
            )

        # State and model, while serving (revocation at shutdown empties the windows).
        assert value("tickcast_symbols_tracked") == 3
        assert value("tickcast_assigned_partitions") == 3
        assert value("tickcast_model_info", version=version, device="cpu") == 1
        assert value("tickcast_model_age_seconds") > 0
        assert value("tickcast_model_reloads_total", result="success") == 0
        assert value("tickcast_model_reloads_total", result="rejected") == 0

        port = service.metrics_port
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            async with http.get("/metrics") as response:
                assert response.status == 200
                exposition = await response.text()
            async with http.get("/healthz") as response:
                assert response.status == 200
            async with http.get("/readyz") as response:
                assert response.status == 200
                assert (await response.json())["ready"] is True
            service.handle_exit()  # graceful stop: not ready from this moment on
            async with http.get("/readyz") as response:
                assert response.status == 503
                body = await response.json()
                assert body["ready"] is False and body["not_stopping"] is False
            async with http.get("/healthz") as response:
                assert response.status == 200  # still alive while it drains

    # Flow counters: exactly what the run produced, nothing counted twice.
    assert value("tickcast_ticks_consumed_total") == first_pass_consumed + len(stream)
    for reason, n in BAD_REASONS.items():
        assert value("tickcast_bad_ticks_total", reason=reason) == n, reason
    assert value("tickcast_dead_letter_records_total") == len(BAD_TICKS)
    assert value("tickcast_predictions_published_total") == PREDICTIONS
    assert value("tickcast_ticks_dropped_total", reason="not_newer") == len(stream)

    # Histograms: one batch-size and one inference observation per forward pass; one
    # end-to-end and one event-time-lag observation per prediction.
    batches = value("tickcast_batch_size_count")
    stamps = len({p["produced_at"] for p in predictions})  # one stamp per batch
    assert stamps <= batches <= PREDICTIONS
    assert value("tickcast_batch_size_sum") == PREDICTIONS
    assert value("tickcast_inference_seconds_count") == batches
    assert value("tickcast_end_to_end_seconds_count") == PREDICTIONS
    assert value("tickcast_end_to_end_seconds_bucket", le="+Inf") == PREDICTIONS
    assert value("tickcast_event_time_lag_seconds_count") == PREDICTIONS
    assert value("tickcast_inflight_windows") == 0

    # Live accuracy: each prediction scored when its symbol's next tick arrived.
    for forecaster, (total, count) in expected_live_errors(predictions).items():
        assert count == 3 * (PER_SYMBOL - WINDOW)
        got_count = value("tickcast_live_absolute_error_count", forecaster=forecaster)
        got_sum = value("tickcast_live_absolute_error_sum", forecaster=forecaster)
        assert got_count == count, forecaster
        assert got_sum == pytest.approx(total, rel=1e-6), forecaster

    # The exposition Prometheus scrapes: process and Python collectors, no per-symbol
    # label, and promtool finds nothing to complain about.
    assert "process_cpu_seconds_total" in exposition
    assert "python_gc_objects_collected_total" in exposition
    assert "NASDAQ" not in exposition and "symbol=" not in exposition
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (Debian package 'prometheus')")
    checked = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=exposition.encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    findings = (checked.stdout + checked.stderr).decode()
    assert checked.returncode == 0 and findings.strip() == "", findings
