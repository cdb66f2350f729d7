"""Helpers for tests that run the daemon against the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import CollectorRegistry

from daemon.metrics import DaemonMetrics
from daemon.service import TickcastService
from daemon.settings import Settings
from model.checkpoint import CheckpointMeta, new_version, promote, save_checkpoint
from model.gru import ModelConfig, PriceGRU
from tests.support.processes import track


def make_checkpoint(root: Path, seed: int = 7, window_length: int = 60) -> str:
    """A checkpoint with seeded random weights (head included), promoted to LATEST.

    Untrained residual models equal the naive forecast whatever the window holds, which
    would hide window bugs; random head weights make every price of the window matter.
    """
    torch.manual_seed(seed)
    model = PriceGRU(ModelConfig(window_length=window_length))
    torch.nn.init.normal_(model.head.weight, std=0.5)
    torch.nn.init.normal_(model.head.bias, std=0.05)
    version = new_version()
    save_checkpoint(root, model, CheckpointMeta(version=version, architecture=model.config))
    promote(root, version)
    return version


@dataclass
class Prediction:
    key: bytes
    symbol: str
    ts: int
    price: float
    predicted: float
    model_version: str
    partition: int
    offset: int
    headers: dict[str, bytes]


def tick_records(
    symbols: list[str], prices: list[float], ts: list[int]
) -> list[tuple[bytes, bytes]]:
    return [
        (s.encode(), orjson.dumps({"symbol": s, "price": p, "ts": t}))
        for s, p, t in zip(symbols, prices, ts, strict=True)
    ]


async def produce(
    bootstrap: str, topic: str, records: Sequence[tuple[bytes | None, bytes]]
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value=v, key=k) for k, v in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def consume(
    bootstrap: str, topic: str, expected: int, timeout_s: float = 60.0, settle_s: float = 0.0
) -> list[Prediction]:
    """Read a topic from the beginning until ``expected`` records (then ``settle_s`` more)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    out: list[Prediction] = []
    deadline = time.monotonic() + timeout_s
    settle_until: float | None = None
    try:
        while time.monotonic() < deadline:
            if len(out) >= expected:
                settle_until = settle_until or time.monotonic() + settle_s
                if time.monotonic() >= settle_until:
                    break
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    v = orjson.loads(r.value)
                    out.append(
                        Prediction(
                            key=r.key,
                            symbol=v["symbol"],
                            ts=v["ts"],
                            price=v["price"],
                            predicted=v["predicted"],
                            model_version=v["model_version"],
                            partition=r.partition,
                            offset=r.offset,
                            headers=dict(r.headers),
                        )
                    )
    finally:
        await consumer.stop()
    return out


async def consume_raw(bootstrap: str, topic: str, expected: int, timeout_s: float = 60.0) -> list:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    out: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out


def daemon_settings(
    bootstrap: str, topics: dict[str, str], checkpoint_dir: Path, group: str, **extra: object
) -> Settings:
    return Settings(
        bootstrap_servers=bootstrap,
        input_topic=topics["input"],
        output_topic=topics["output"],
        dlq_topic=topics["dlq"],
        group_id=group,
        checkpoint_dir=checkpoint_dir,
        metrics_port=0,
        device="cpu",
        checkpoint_poll_s=0.2,
        **extra,  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def running_daemon(settings: Settings) -> AsyncIterator[TickcastService]:
    """An in-process daemon on a fresh metrics registry; graceful stop on exit."""
    service = TickcastService(settings, DaemonMetrics(CollectorRegistry()))
    task = asyncio.create_task(service.serve())
    deadline = time.monotonic() + 60
    while not all(service.readiness().values()):
        if task.done():
            await task
            raise RuntimeError("daemon exited during start-up")
        if time.monotonic() > deadline:
            raise TimeoutError(f"daemon not ready: {service.readiness()}")
        await asyncio.sleep(0.05)
    try:
        yield service
    finally:
        service.handle_exit()
        await asyncio.wait_for(task, 60)


def reference_predictions(checkpoint_dir: Path, windows: np.ndarray) -> np.ndarray:
    from model.checkpoint import load_latest
    from model.gru import predict_prices

    return predict_prices(load_latest(checkpoint_dir).model, windows).numpy()


def expected_windows(prices: np.ndarray, window_length: int) -> np.ndarray:
    """Every full window of one symbol's prices, oldest first."""
    return np.lib.stride_tricks.sliding_window_view(prices, window_length)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# daemon.http logs where it serves /metrics once bound.
METRICS_LOG_LINE = re.compile(rb"metrics on http://[^/\s]+:(\d+)/metrics")


class DaemonProcess:
    """``python -m daemon`` in a child process, for crash tests (SIGKILL)."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        import os

        self._port: int | None = None  # bound by the daemon itself: known once it is ready
        self.env = {
            **os.environ,
            "TICKCAST_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "TICKCAST_INPUT_TOPIC": settings.input_topic,
            "TICKCAST_OUTPUT_TOPIC": settings.output_topic,
            "TICKCAST_DLQ_TOPIC": settings.dlq_topic,
            "TICKCAST_GROUP_ID": settings.group_id,
            "TICKCAST_CHECKPOINT_DIR": str(settings.checkpoint_dir),
            # Port 0: the daemon binds a free port itself and logs it, so no other process
            # can take the port between choosing it here and the child binding it.
            "TICKCAST_METRICS_PORT": "0",
            "TICKCAST_METRICS_HOST": "127.0.0.1",
            "TICKCAST_DEVICE": "cpu",
            "TICKCAST_DELIVERY": settings.delivery,
        }
        self.log_path = log_path
        self.process: object = None

    def start(self) -> None:
        import subprocess
        import sys

        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self._log_start = self._log.tell()  # this run's part of the log starts here
        self._port = None
        self.process = track(
            subprocess.Popen(
                [sys.executable, "-m", "daemon"], env=self.env, stdout=self._log, stderr=self._log
            )
        )

    async def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:  # type: ignore[attr-defined]
                self._log.close()
                raise RuntimeError(f"daemon exited: {self.log_path.read_text()[-3000:]}")
            if self._port is None:
                self._port = self._logged_port()
            if self._port is not None and await asyncio.to_thread(self._ready):
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"daemon not ready: {self.log_path.read_text()[-3000:]}")

    @property
    def port(self) -> int:
        """The daemon's metrics port, as it logged it (see :meth:`wait_ready`)."""
        if self._port is None:
            raise RuntimeError("the daemon's metrics port is known once it is ready")
        return self._port

    def _logged_port(self) -> int | None:
        with self.log_path.open("rb") as log:
            log.seek(self._log_start)
            found = METRICS_LOG_LINE.search(log.read())
        return int(found.group(1)) if found else None

    def _ready(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def kill(self) -> None:
        import signal

        self.process.send_signal(signal.SIGKILL)  # type: ignore[attr-defined]
        self.process.wait(10)  # type: ignore[attr-defined]
        self._log.close()

    def terminate(self, timeout_s: float = 30, sig: int | None = None) -> int:
        """Send SIGTERM (or ``sig``) and wait for the exit code."""
        import signal

        self.process.send_signal(sig or signal.SIGTERM)  # type: ignore[attr-defined]
        code = int(self.process.wait(timeout_s))  # type: ignore[attr-defined]
        self._log.close()
        return code
