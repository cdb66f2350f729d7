"""``tickcast bench``: the end-to-end benchmark, in one run, on a real Kafka broker.

Phases (each daemon runs as a child process, ``python -m daemon.bench``, so its CPU time
and RSS are its own; the broker, the tick producer and the prediction consumer share the
same machine, as they would on a small box):

* (a) model ceiling: ``Predictor.predict`` (scale + forward + unscale) on batches alone,
  swept over batch sizes, for nn.GRU and the explicit GRU-cell forward (TorchScript, and
  ``torch.compile``-d), on 1 and 2 threads; plus the FLOP fraction of a measured sgemm peak.
  The sweep picks the best point; (a) is the median of longer re-measurements of that point
  (after the sweep and before each (c) drain), not the sweep's fastest short sample.
* (b) naive baseline: the seed's way, one forward pass per tick: the daemon itself with
  ``max_batch_size=1`` and ``nn.GRU``, draining a backlog through Kafka.
* (c) tickcast: the daemon with its defaults (dynamic batching, fast forward) draining
  the same kind of backlog; every tick with a full window must come back predicted.
* latency: the (c) daemon under live, rate-limited load (fractions of (c)); ticks carry
  the wall clock as ``ts``, and latency = time a consumer of the output topic receives
  the prediction - ts.
* conflation: ingest rate with ``conflate=True`` on a few hot symbols.
* memory: 1,000,000 symbols in a child that builds the service and fills its windows
  directly (not through Kafka); the RSS is the child's real RSS.
* soak (``--soak SECONDS``): the (c) daemon's RSS sampled under half load.

Prices are real (``dataset:nasdaq``, ``sp500``, ``goog``, ``eurusd``, ``btcusd``),
replicated over S symbols: ``NASDAQ.17`` is NASDAQ's series started at another offset
(and cycled when it runs out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from daemon.ticks import encode_ticks, tick_prefix

logger = logging.getLogger(__name__)

REAL_SERIES = (
    "dataset:nasdaq",
    "dataset:sp500",
    "dataset:goog",
    "dataset:eurusd",
    "dataset:btcusd",
)
BATCH_SIZES = (1, 16, 64, 256, 512, 1024, 2048, 4096)
GPU_BATCH_SIZES = (*BATCH_SIZES, 16_384, 65_536)  # up to the largest CUDA bucket
TARGETS = {
    "c_over_b": 20.0,
    "c_over_a": 0.6,
    "p99_ms_at_half_load": 50.0,
    "rss_1m_symbols_bytes": 1 << 30,
    "serving_ceiling_windows_per_s": 60_000.0,
    "restore_seconds": 5.0,
}
GPU_CEILING_WINDOWS_PER_S = 1_000_000.0  # the ceiling target on a CUDA GPU
WINDOW = 60
PARTITIONS = 3  # of the bench's input and output topics
COMMIT_POLL_FINE_S = 0.01  # how closely a drain's end is timed
COMMIT_POLL_COARSE_S = 0.25


# ============================================================================ plan
@dataclass(frozen=True)
class Plan:
    """How much of everything one run does (``--quick`` shrinks it)."""

    symbols: int
    naive_predictions: int
    predictions: int
    live_seconds: float
    warmup_seconds: float  # half load before the latency figures, not measured
    loads: tuple[float, ...]
    batch_sizes: tuple[int, ...]
    seconds_per_point: float
    # The sweep's best point is re-measured this long, once after the sweep and once
    # before each (c) drain: (a) is the median of those, not the sweep's luckiest sample.
    confirm_seconds: float
    memory_symbols: int
    conflate_symbols: int
    conflate_ticks: int
    max_batch_size: int
    compile: str
    compile_loop_in_ceiling: bool
    compile_in_ceiling: bool
    soak_seconds: float
    daemon_threads: int | None
    restore_symbols: int
    restore_ticks: int
    c_drains: int  # (c) is the median of this many drains, each on a fresh daemon

    @staticmethod
    def from_args(args: argparse.Namespace) -> Plan:
        from daemon.predictor import resolve_device

        quick = bool(args.quick)
        on_gpu = resolve_device(args.device).type == "cuda"  # "auto" included
        return Plan(
            symbols=args.symbols_live or (100 if quick else 1000),
            naive_predictions=args.naive_predictions or (100 if quick else 1000),
            predictions=args.predictions or (10_000 if quick else 300_000),
            live_seconds=args.live_seconds or (2.0 if quick else 10.0),
            warmup_seconds=2.0 if quick else 20.0,
            loads=(0.5,) if quick else (0.25, 0.5, 0.75, 1.0),
            batch_sizes=(1, 256, 1024) if quick else (GPU_BATCH_SIZES if on_gpu else BATCH_SIZES),
            seconds_per_point=0.1 if quick else 0.6,
            confirm_seconds=0.2 if quick else 3.0,
            memory_symbols=args.symbols if args.symbols is not None else 1_000_000,
            conflate_symbols=50,
            conflate_ticks=3_000 if quick else 200_000,  # ~2 s: 50,000 (~0.4 s) was noise
            max_batch_size=args.max_batch_size,
            compile=args.compile,
            compile_loop_in_ceiling=bool(args.compile_loop),
            compile_in_ceiling=not quick,
            soak_seconds=float(args.soak or 0.0),
            daemon_threads=args.daemon_threads,
            restore_symbols=args.restore_symbols
            if args.restore_symbols is not None
            else (200 if quick else 10_000),
            restore_ticks=args.restore_ticks or (100 if quick else 1_000),
            c_drains=args.c_drains or (1 if quick else 3),
        )


# ============================================================================ prices
@dataclass(frozen=True)
class TickSource:
    """Real prices for S symbols; tick k belongs to symbol k % S (round robin)."""

    names: list[str]
    key_bytes: list[bytes]
    prices: np.ndarray  # [S, ticks_per_symbol] float64
    note: str
    # Each symbol's tick JSON up to its price, encoded once: b'{"symbol":"QQQ.0","price":'
    value_prefixes: list[bytes]

    @staticmethod
    def build(n_symbols: int, ticks_per_symbol: int) -> TickSource:
        from model.data import load_many

        series = load_many(list(REAL_SERIES))
        names: list[str] = []
        rows = np.empty((n_symbols, ticks_per_symbol))
        steps = np.arange(ticks_per_symbol)
        for i in range(n_symbols):
            base = series[i % len(series)]
            replica = i // len(series)
            names.append(f"{base.symbol}.{replica}")
            offset = (replica * 97) % len(base.prices)
            rows[i] = base.prices[(offset + steps) % len(base.prices)]
        note = (
            f"{n_symbols} symbols replicate {len(series)} real series "
            f"({', '.join(s.symbol for s in series)}); replica r starts r*97 rows later "
            "and cycles; ts = wall clock at produce time"
        )
        return TickSource.of(names, rows, note)

    @staticmethod
    def of(names: list[str], prices: np.ndarray, note: str) -> TickSource:
        prefixes = [tick_prefix(n) for n in names]
        return TickSource(names, [n.encode() for n in names], prices, note, prefixes)

    @property
    def n_symbols(self) -> int:
        return len(self.names)


class TickWriter:
    """Produces ticks k = start.. of a :class:`TickSource`, stamped with the wall clock."""

    def __init__(self, source: TickSource, producer: Any, topic: str) -> None:
        from daemon.publisher import BatchPublisher

        self.source = source
        self.topic = topic
        self.publisher = BatchPublisher(producer)
        self.next_tick = 0
        self.last_step_ts = 0
        self.pending: list[Any] = []

    def _records(self, n: int) -> list[Any]:
        s = self.source
        k = np.arange(self.next_tick, self.next_tick + n)
        sym, step = k % s.n_symbols, k // s.n_symbols
        if step[-1] >= s.prices.shape[1]:
            raise RuntimeError("the tick source ran out of prices; build it larger")
        # A symbol's ts must grow: one ms per round robin at least, else the wall clock.
        first = max(int(time.time() * 1000), self.last_step_ts + 1)
        ts = first + (step - step[0])
        self.last_step_ts = int(ts[-1])
        self.next_tick += n
        # The load generator shares the 2 cores with the daemon it measures: batched.
        symbols = sym.tolist()
        prefixes, keys = s.value_prefixes, s.key_bytes
        values = encode_ticks([prefixes[i] for i in symbols], s.prices[sym, step], ts.tolist())
        return [(keys[i], value, []) for i, value in zip(symbols, values, strict=True)]

    async def write(self, n: int) -> None:
        self.pending.extend(await self.publisher.send(self.topic, self._records(n)))
        if len(self.pending) > 64:
            await self.flush()

    async def flush(self) -> None:
        await asyncio.gather(*(d.future for d in self.pending))
        self.pending.clear()

    async def write_backlog(self, n: int, slice_size: int = 2000) -> None:
        for start in range(0, n, slice_size):
            await self.write(min(slice_size, n - start))
        await self.flush()

    async def write_at_rate(self, rate: float, seconds: float) -> tuple[int, float]:
        """Offered load: ``rate`` ticks/s for ``seconds``; returns (ticks, real seconds)."""
        step = max(1, min(2000, int(rate / 200)))
        started = time.monotonic()
        sent = 0
        while True:
            elapsed = time.monotonic() - started
            if elapsed >= seconds:
                break
            due = int(rate * elapsed) + step
            if sent >= due:
                await asyncio.sleep(step / rate)
                continue
            await self.write(due - sent)
            sent = due
        await self.flush()
        return sent, time.monotonic() - started


# ============================================================================ output
class _PredictionTs(msgspec.Struct):
    ts: int


_decode_prediction_ts = msgspec.json.Decoder(_PredictionTs).decode


def _prediction_ts(record: Any) -> int:
    """A prediction's ts, parsed in C without building the rest of it (the reader shares
    the cores with the daemon it measures: 0.23 us per record, 0.52 us via a dict)."""
    return _decode_prediction_ts(record.value).ts


class PredictionReader:
    """Reads the output topic from the start; keeps (received at, ts, symbol id) per record."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.received: list[np.ndarray] = []  # float64 wall time per record
        self.ts: list[np.ndarray] = []
        self.produced_ms: list[np.ndarray] = []  # each record's Kafka (create) timestamp
        self.keys: list[np.ndarray] = []  # bytes arrays: no Python object per record
        self.count = 0
        self._task: asyncio.Task[None] | None = None
        self._consumer: Any = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer

        from daemon.raw_records import raw_value

        self._consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_bytes=16 * 1024 * 1024,
            max_partition_fetch_bytes=8 * 1024 * 1024,
            # Like the daemon: fuller fetches, so the reader's CPU does not crowd it out.
            fetch_min_bytes=64 * 1024,
            fetch_max_wait_ms=5,
            value_deserializer=raw_value,  # records as fetched: no ConsumerRecord each
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._consumer is not None
        while not self._stop.is_set():
            fetched = await self._consumer.getmany(timeout_ms=50, max_records=20_000)
            now = time.time()
            for records in fetched.values():
                if not records:
                    continue
                ts = np.fromiter(map(_prediction_ts, records), np.int64, len(records))
                self.ts.append(ts)
                self.received.append(np.full(len(records), now))
                self.produced_ms.append(
                    np.fromiter((r.timestamp for r in records), np.int64, len(records))
                )
                self.keys.append(np.array([r.key for r in records], dtype=np.bytes_))
                self.count += len(records)

    async def wait_for(self, total: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.count < total:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def read_to_end(self, timeout_s: float) -> bool:
        """Wait until every record now in the topic has been read.

        Offsets count records here: the bench's output topics are fresh and written
        without transactions, so there are no control records between them.
        """
        from aiokafka import TopicPartition

        assert self._consumer is not None
        await self._consumer.topics()  # refreshes metadata: partitions_for_topic is cached
        partitions = self._consumer.partitions_for_topic(self.topic) or set()
        ends = await self._consumer.end_offsets([TopicPartition(self.topic, p) for p in partitions])
        return await self.wait_for(sum(ends.values()), timeout_s)

    def first_produced_at(self) -> float | None:
        """Wall time (s) at which the earliest record read so far was produced."""
        if not self.produced_ms:
            return None
        return float(min(a.min() for a in self.produced_ms if len(a))) / 1000.0

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.ts:
            return np.empty(0), np.empty(0, np.int64)
        return np.concatenate(self.received), np.concatenate(self.ts)

    def distinct(self) -> int:
        """Distinct (symbol, ts) predictions: redeliveries would repeat a pair."""
        _, ts = self.arrays()
        if not len(ts):
            return 0
        _, symbol_ids = np.unique(np.concatenate(self.keys), return_inverse=True)
        return len(np.unique(np.stack([symbol_ids.astype(np.int64), ts], axis=1), axis=0))

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        if self._consumer is not None:
            await self._consumer.stop()


def latency_summary(seconds: np.ndarray) -> dict[str, float]:
    if not len(seconds):
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan"), "n": 0}
    p50, p99 = np.percentile(seconds, [50, 99]) * 1000.0
    return {
        "p50_ms": round(float(p50), 2),
        "p99_ms": round(float(p99), 2),
        "max_ms": round(float(seconds.max() * 1000.0), 2),
        "n": len(seconds),
    }


# ============================================================================ child daemon
@dataclass
class ChildConfig:
    """What a child daemon runs: settings overrides plus predictor options."""

    settings: dict[str, Any]
    fast: bool = True
    compile: str | None = None
    threads: int | None = None
    mode: str = "serve"  # or "memory"
    memory_symbols: int = 0


def _child_main(config_json: str) -> int:
    """Entry of ``python -m daemon.bench CONFIG``: one daemon (or the memory probe)."""
    import torch
    from prometheus_client import CollectorRegistry

    from daemon.metrics import DaemonMetrics
    from daemon.predictor import load_predictor, resolve_device
    from daemon.service import TickcastService, inference_threads, inference_workers
    from daemon.settings import Settings
    from model.checkpoint import read_latest

    config = ChildConfig(**json.loads(config_json))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    settings = Settings(**config.settings)
    device = resolve_device(settings.device)
    # The same thread count `tickcast serve` would use (TICKCAST_TORCH_THREADS or its
    # default), unless --daemon-threads overrides it.
    workers = inference_workers(settings, device, compiled=config.compile is not None)
    torch.set_num_threads(config.threads or inference_threads(settings, workers))
    root = Path(settings.checkpoint_dir)
    predictor = load_predictor(
        root / str(read_latest(root)),
        device,
        fast=config.fast,
        compile=config.compile,  # type: ignore[arg-type]
    )
    if predictor.fast is not None and config.compile:
        started = time.perf_counter()
        predictor.fast.wait_compiled()
        print(
            json.dumps({"compile_s": time.perf_counter() - started, "path": predictor.path}),
            flush=True,
        )
    if config.mode == "memory":
        print(json.dumps(_memory_probe(settings, predictor, config.memory_symbols)), flush=True)
        return 0
    service = TickcastService(settings, DaemonMetrics(CollectorRegistry()), predictor)
    asyncio.run(service.serve())
    return 0


def proc_rss_bytes(pid: int | str = "self") -> int:
    """Resident set size from /proc (Linux): the process's real memory, not an estimate."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def proc_cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process from /proc/PID/stat (Linux)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_bytes() -> int:
    return proc_rss_bytes()


def _memory_probe(settings: Any, predictor: Any, n_symbols: int) -> dict[str, Any]:
    """RSS of a built (not started) service whose windows hold ``n_symbols`` full windows.

    Windows are filled directly (slots allocated through ``slots_for``, prices written
    into the arrays), then one real ``apply`` of a tick per symbol and one scored batch.
    """
    import gc

    from prometheus_client import CollectorRegistry

    from daemon.metrics import DaemonMetrics
    from daemon.service import TickcastService

    service = TickcastService(settings, DaemonMetrics(CollectorRegistry()), predictor)
    gc.collect()
    empty_rss = _rss_bytes()
    windows = service.windows
    names = [f"S{i:07d}" for i in range(n_symbols)]
    slots = windows.slots_for(names, np.zeros(n_symbols, np.int32))
    rng = np.random.default_rng(0)
    chunk = 100_000
    for start in range(0, n_symbols, chunk):
        part = slots[start : start + chunk]
        walk = 100.0 * np.exp(np.cumsum(rng.normal(0, 0.01, (len(part), WINDOW)), axis=1))
        windows.prices[part] = walk
        windows.count[part] = WINDOW
        windows.last_ts[part] = 1
    del names
    # One real tick per symbol through the vectorised apply, in fetch-sized pieces.
    for start in range(0, n_symbols, 5000):
        part = slots[start : start + 5000]
        applied = windows.apply(
            part, windows.prices[part, -1] * 1.001, np.full(len(part), 2, np.int64)
        )
        if start == 0:
            predictor.predict(applied.windows[:1024])
    # A running daemon holds no per-symbol array beyond windows: drop the probe's own
    # (walk, the last 100,000 x 60 float64 chunk, held 46 MiB here until v8).
    del slots, part, applied, walk
    gc.collect()
    rss = _rss_bytes()
    return {
        "symbols": len(windows),
        "rss_bytes": rss,
        "rss_empty_service_bytes": empty_rss,
        "windows_array_bytes": int(windows.nbytes),
        "bytes_per_symbol": round((rss - empty_rss) / max(n_symbols, 1), 1),
        "method": "service built (not started); windows filled directly, then one real "
        "apply() per symbol and one scored batch; RSS = the child's real RSS",
    }


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ChildDaemon:
    """A daemon in a child process, its readiness, and its CPU/RSS (from /proc)."""

    def __init__(self, config: ChildConfig, log_path: Path) -> None:
        self.config = config
        self.port = free_port()
        config.settings.update(metrics_port=self.port, metrics_host="127.0.0.1")
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daemon.bench", json.dumps(asdict(config))],
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self.compile_s: float | None = None

    def read_json_line(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"bench child exited: {self.log_path.read_text()[-3000:]}")
        return dict(json.loads(line))

    async def wait_ready(self, timeout_s: float = 600.0) -> None:
        if self.config.compile:
            info = await asyncio.to_thread(self.read_json_line)
            self.compile_s = float(info["compile_s"])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log_path.read_text()[-3000:]}")
            if await asyncio.to_thread(self._ready):
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"daemon not ready: {self.log_path.read_text()[-3000:]}")

    def _ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.port}/readyz"
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.process.pid)

    def rss(self) -> int:
        return proc_rss_bytes(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()


def parse_proc_stat(first_line: str, ticks_per_s: float) -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine from /proc/stat's ``cpu`` line.
    Busy is user, nice, system, irq and softirq; stolen is time the hypervisor gave this
    VM's CPUs to someone else, which no process here sees in its own CPU time."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, first_line.split()[1:9])
    return (user + nice + system + irq + softirq) / ticks_per_s, steal / ticks_per_s


def machine_cpu_seconds() -> tuple[float, float]:
    """:func:`parse_proc_stat` now; (nan, nan) where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            return parse_proc_stat(f.readline(), os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError):
        return float("nan"), float("nan")


class Sampler:
    """Samples a child's CPU seconds and RSS, and the machine's busy and stolen CPU
    seconds, every ``period`` seconds in a thread."""

    def __init__(self, child: ChildDaemon, period: float = 0.1) -> None:
        self.child = child
        self.period = period
        # (time.time(), child cpu s, child rss, machine busy s, machine stolen s)
        self.samples: list[tuple[float, float, int, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                cpu, rss = self.child.cpu_seconds(), self.child.rss()
                self.samples.append((time.time(), cpu, rss, *machine_cpu_seconds()))
            self._stop.wait(self.period)

    def window(self, start: float, stop: float) -> dict[str, float]:
        """The child's CPU use (cores) and RSS, and the machine's busy and stolen cores,
        over [start, stop] of wall time."""
        inside = [s for s in self.samples if start <= s[0] <= stop]
        if len(inside) < 2:
            inside = self.samples[-2:]
        first, last = inside[0], inside[-1]
        wall = max(last[0] - first[0], 1e-9)
        return {
            "cpu_cores": round((last[1] - first[1]) / wall, 2),
            "rss_max_bytes": max(s[2] for s in inside),
            "machine_busy_cores": round((last[3] - first[3]) / wall, 2),
            "machine_stolen_cores": round((last[4] - first[4]) / wall, 2),
        }

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ============================================================================ phases
@dataclass
class Context:
    bootstrap: str
    checkpoint_dir: Path
    work_dir: Path
    device: str
    plan: Plan
    results: dict[str, Any] = field(default_factory=dict)
    # False against Tansu, which rejects aiokafka's InitProducerId v0 (daemon/tansu.py).
    idempotent: bool = True
    # Re-measures the ceiling sweep's best point (set by phase_ceiling).
    ceiling_probe: CeilingProbe | None = None

    async def topics(self, name: str, partitions: int = PARTITIONS) -> dict[str, str]:
        from daemon.embedded_kafka import create_topics

        suffix = uuid.uuid4().hex[:8]
        topics = {
            "input": f"bench-{name}-ticks-{suffix}",
            "output": f"bench-{name}-predictions-{suffix}",
            "dlq": f"bench-{name}-dlq-{suffix}",
        }
        await create_topics(self.bootstrap, [topics["input"], topics["output"]], partitions)
        await create_topics(self.bootstrap, [topics["dlq"]], 1)
        return topics

    def child_config(self, topics: dict[str, str], **settings: Any) -> dict[str, Any]:
        return {
            "bootstrap_servers": self.bootstrap,
            "input_topic": topics["input"],
            "output_topic": topics["output"],
            "dlq_topic": topics["dlq"],
            "group_id": f"bench-{uuid.uuid4().hex[:8]}",
            "checkpoint_dir": str(self.checkpoint_dir),
            "device": self.device,
            "checkpoint_poll_s": 30.0,
            "log_level": "WARNING",
            "enable_idempotence": self.idempotent,
            **settings,
        }


@contextlib.asynccontextmanager
async def producer_for(bootstrap: str, idempotent: bool = True) -> AsyncIterator[Any]:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=idempotent,
        # Short, but not 0: at 18,000 ticks/s linger 0 took the bench from 0.32 to 0.65
        # cores and the broker from 0.25 to 0.48 (more, smaller produce requests).
        linger_ms=2,
        max_batch_size=512 * 1024,
    )
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_rate(predict: Any, windows: np.ndarray, seconds: float) -> float:
    predict(windows)  # warm
    n, started = 0, time.perf_counter()
    while True:
        predict(windows)
        n += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and n >= 3:
            return len(windows) * n / elapsed


def measure_parallel_rate(predict: Any, windows: np.ndarray, seconds: float, workers: int) -> float:
    """``workers`` threads calling ``predict`` at once, as the daemon's inference workers
    do; all windows scored over the wall time of the slowest (no partial overlap counted).
    """
    from concurrent.futures import ThreadPoolExecutor

    start = threading.Barrier(workers)

    def run(_: int) -> int:
        predict(windows)  # warm
        start.wait()
        n, started = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - started < seconds:
            predict(windows)
            n += 1
        return n

    began = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        calls = sum(pool.map(run, range(workers)))
    return len(windows) * calls / (time.perf_counter() - began)


@dataclass
class CeilingProbe:
    """One point of the ceiling sweep (forward path, threads, workers, batch), measurable
    again. Short samples of one point vary by a third on this VM (0.6 s each: 65,000 to
    96,000 windows/s for the same batch of 1,024), so the fastest of a sweep's dozens of
    samples is its luckiest one; (a) is the median of longer re-measurements of the point
    the sweep picked, taken after the sweep and beside each (c) drain."""

    path: str
    batch: int
    predict: Callable[[np.ndarray], Any]
    threads: int
    workers: int
    windows: np.ndarray

    def measure(self, seconds: float) -> float:
        with torch_threads(self.threads):
            if self.workers > 1:
                return measure_parallel_rate(self.predict, self.windows, seconds, self.workers)
            return measure_rate(self.predict, self.windows, seconds)


def confirm_ceiling(ctx: Context) -> None:
    """Re-measure the sweep's best point; (a) becomes the median of the re-measurements."""
    probe, a = ctx.ceiling_probe, ctx.results["a_ceiling"]
    if probe is None:
        return
    best = a["best"]
    best["confirmations"].append(round(probe.measure(ctx.plan.confirm_seconds)))
    best["windows_per_s"] = round(float(np.median(best["confirmations"])))
    if a.get("sgemm_peak_flops_2t"):
        fraction = best["windows_per_s"] * a["flops_per_window"] / a["sgemm_peak_flops_2t"]
        a["flop_fraction_of_sgemm_peak"] = round(fraction, 3)


def sgemm_peak(threads: int, seconds: float) -> float:
    """Measured float32 matmul FLOP/s (2048^3), the practical roof of this CPU."""
    import torch

    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
    with torch_threads(threads):
        torch.mm(a, b)
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or n < 3:
            torch.mm(a, b)
            n += 1
        return float(2 * 2048**3 * n / (time.perf_counter() - started))


def phase_ceiling(ctx: Context) -> dict[str, Any]:
    """(a): Predictor.predict alone over batch sizes, per forward path and thread count."""
    import torch

    from daemon.predictor import Predictor, resolve_device
    from daemon.service import inference_workers
    from daemon.settings import Settings
    from model.checkpoint import load_latest
    from model.fast_gru import gru_flops

    plan = ctx.plan
    device = resolve_device(ctx.device)
    workers = inference_workers(Settings(), device, compiled=False)
    source = TickSource.build(64, WINDOW + 64)
    pool = np.lib.stride_tricks.sliding_window_view(source.prices, WINDOW, axis=1).reshape(
        -1, WINDOW
    )
    variants: list[tuple[str, dict[str, Any]]] = []
    if device.type == "cuda":
        variants.append(("cuda-graph", {"fast": False}))
    else:
        variants += [("nn.GRU", {"fast": False}), ("scripted-cell", {"fast": True})]
        if plan.compile_in_ceiling:  # --quick skips it: seconds of C++ compilation
            variants.append(("compiled-step", {"fast": True, "compile": "step"}))
        if plan.compile_loop_in_ceiling:
            variants.append(("compiled-loop", {"fast": True, "compile": "loop"}))
    curves: dict[str, dict[str, float]] = {}
    compile_s: dict[str, float | None] = {}
    best: tuple[float, CeilingProbe] | None = None
    for name, options in variants:
        predictor = Predictor(load_latest(ctx.checkpoint_dir, device), device, **options)
        if predictor.fast is not None and options.get("compile"):
            started = time.perf_counter()
            ok = predictor.fast.wait_compiled()
            compile_s[name] = round(time.perf_counter() - started, 1) if ok else None
            if not ok:
                logger.warning("%s unavailable: %s", name, predictor.fast.compile_error)
                continue
        # (threads per forward, forwards at once): the daemon's CPU default is one
        # single-threaded worker per core, so that is measured beside 1 and 2 threads.
        shapes = [(torch.get_num_threads(), 1)]
        if device.type == "cpu":
            shapes = [(1, 1), (2, 1)]
            if name == "scripted-cell" and workers > 1:
                shapes.append((1, workers))
        for threads, parallel in shapes:
            key = f"{name}/{threads}t" + (f"x{parallel}w" if parallel > 1 else "")
            with torch_threads(threads):
                curve: dict[str, float] = {}
                for batch in plan.batch_sizes:
                    windows = np.ascontiguousarray(np.resize(pool, (batch, WINDOW)))
                    rate = (
                        measure_parallel_rate(
                            predictor.predict, windows, plan.seconds_per_point, parallel
                        )
                        if parallel > 1
                        else measure_rate(predictor.predict, windows, plan.seconds_per_point)
                    )
                    curve[str(batch)] = round(rate)
                    if best is None or rate > best[0]:
                        best = (
                            rate,
                            CeilingProbe(key, batch, predictor.predict, threads, parallel, windows),
                        )
                curves[key] = curve
                print(f"  ceiling {key:>22}: {curve}", flush=True)
    assert best is not None, "the ceiling sweep measured nothing"
    sweep_max, ctx.ceiling_probe = best
    result = {
        "what": "Predictor.predict (scale + forward + unscale), batches in memory, windows/s",
        "device": device.type,
        "curves": curves,
        "compile_seconds": compile_s,
        "best": {
            "path": ctx.ceiling_probe.path,
            "batch": ctx.ceiling_probe.batch,
            "windows_per_s": None,  # the median of the confirmations (confirm_ceiling)
            "sweep_max_windows_per_s": round(sweep_max),
            "confirm_seconds": plan.confirm_seconds,
            "confirmations": [],
        },
        "flops_per_window": gru_flops(),
        "flops_formula": "T*(6H^2 + 6H + 3H + 10H) + 2H + 1, H=64, T=60",
        "sgemm_peak_flops_2t": sgemm_peak(2, 1.0) if device.type == "cpu" else None,
        "flop_fraction_of_sgemm_peak": None,
    }
    ctx.results["a_ceiling"] = result
    confirm_ceiling(ctx)
    return result


async def drain_backlog(
    ctx: Context,
    name: str,
    child_settings: dict[str, Any],
    source: TickSource,
    ticks: int,
    *,
    fast: bool,
    compile: str | None,
    keep: bool = False,
) -> tuple[dict[str, Any], Any]:
    """Produce ``ticks`` first, then start a daemon and time it through the backlog.

    Timed from the first prediction's produce timestamp until the daemon's group has
    committed every input offset (it commits an offset only once the broker has
    acknowledged the prediction for it). The predictions are read afterwards, to check
    that every window was predicted once: a reader running alongside would take the
    daemon's CPU (a quarter of a core at 50,000 predictions/s) for a figure that does
    not need it. The reader stays on for the live phases when ``keep``.
    """
    topics = await ctx.topics(name)
    async with producer_for(ctx.bootstrap, ctx.idempotent) as producer:
        writer = TickWriter(source, producer, topics["input"])
        started = time.perf_counter()
        await writer.write_backlog(ticks)
        produce_s = time.perf_counter() - started
    conflate = bool(child_settings.get("conflate"))
    filling = source.n_symbols * (WINDOW - 1)  # ticks that only fill windows, unscored
    expected = None if conflate else ticks - filling
    child = ChildDaemon(
        ChildConfig(
            settings=ctx.child_config(topics, **child_settings), fast=fast, compile=compile
        ),
        ctx.work_dir / f"daemon-{name}.log",
    )
    sampler = Sampler(child)
    reader = PredictionReader(ctx.bootstrap, topics["output"])
    try:
        await child.wait_ready()
        done_at = await wait_committed(ctx.bootstrap, child.config.settings, topics, ticks)
        await reader.start()
        if not await reader.read_to_end(timeout_s=600):
            raise RuntimeError(f"{name}: read {reader.count} predictions, the topic has more")
        if expected is not None and reader.count < expected:
            raise RuntimeError(f"{name}: {reader.count} of {expected} predictions arrived")
        first_at = reader.first_produced_at()
        assert first_at is not None
        seconds = max(done_at - first_at, 1e-6)
        scored = reader.count
        result: dict[str, Any] = {
            "ticks": ticks,
            "symbols": source.n_symbols,
            "windows_expected": expected,
            "predictions": scored,
            "distinct_predictions": reader.distinct(),
            "seconds": round(seconds, 3),
            "predictions_per_s": round(scored / seconds),
            "timed": "first prediction produced -> every input offset committed",
            "backlog_produce_s": round(produce_s, 2),
            **sampler.window(first_at, done_at),
        }
        if conflate:
            result["ingest_ticks_per_s"] = round((ticks - filling) / seconds)
        if child.compile_s is not None:
            result["compile_s"] = round(child.compile_s, 1)
        if keep:
            return result, (child, sampler, reader, topics, source)
    except BaseException:
        sampler.stop()
        child.stop()
        await reader.stop()
        raise
    sampler.stop()
    child.stop()
    await reader.stop()
    return result, None


async def wait_committed(
    bootstrap: str, settings: dict[str, Any], topics: dict[str, str], total: int
) -> float:
    """Wall time at which the daemon's group has committed ``total`` input offsets.

    Asked through a consumer of that group that never subscribes (OffsetFetch), which
    Tansu serves too; the admin client's ListConsumerGroupOffsets it does not. The poll
    is sparse while the end is far and dense near it: polling every 20 ms throughout
    cost the broker 0.14 of the 2 cores it shares with the daemon being timed (measured
    against polls every 100 ms), for a resolution only the last poll needs.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=settings["group_id"], enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topics["input"], p) for p in range(PARTITIONS)]
        first: tuple[float, int] | None = None  # first poll that saw progress
        while True:
            committed = sum([(await consumer.committed(tp)) or 0 for tp in tps])
            now = time.time()
            if committed >= total:
                return now
            if first is None and committed > 0:
                first = (now, committed)
            await asyncio.sleep(next_commit_poll_s(first, now, committed, total))
    finally:
        await consumer.stop()


def next_commit_poll_s(
    first: tuple[float, int] | None,
    now: float,
    committed: int,
    total: int,
    *,
    fine: float = COMMIT_POLL_FINE_S,
    coarse: float = COMMIT_POLL_COARSE_S,
) -> float:
    """Seconds until the next poll: half the time the commits so far say is left,
    between ``fine`` and ``coarse``; ``fine`` until there is a rate to go by, since a
    short drain (conflation: ~0.3 s) may end within its first two commits."""
    if first is None or committed <= first[1] or now <= first[0]:
        return fine
    rate = (committed - first[1]) / (now - first[0])
    return min(coarse, max(fine, 0.5 * (total - committed) / rate))


def freeze_garbage_collector() -> None:
    """Exempt the bench's long-lived objects (torch, clients, data) from collections.

    The load generator and the prediction reader share this process: a full collection
    that scans them stalled both for ~200 ms every few seconds (measured with gc
    callbacks), which showed up as 250 ms latency spikes that were not the daemon's.
    The daemon does the same after its start-up.
    """
    import gc

    gc.collect()
    gc.freeze()


async def live_loads(
    ctx: Context,
    kept: Any,
    rate_c: float,
    loads: Sequence[float],
    seconds: float,
    warmup_s: float,
) -> list[dict[str, Any]]:
    """Offered load at fractions of (c); latency = received - ts (wall clock in ticks)."""
    _, sampler, reader, topics, source = kept
    out = []
    freeze_garbage_collector()
    async with producer_for(ctx.bootstrap, ctx.idempotent) as producer:
        writer = TickWriter(source, producer, topics["input"])
        writer.next_tick = source.n_symbols * (source.prices.shape[1] // 2)
        writer.last_step_ts = int(time.time() * 1000) + 1
        # Steady state, not start-up: the JVM broker compiles its hot paths over its first
        # minute of load (measured: its CPU at a fixed rate fell from 0.8 to 0.25 cores).
        warm_from = reader.count
        sent, _ = await writer.write_at_rate(0.5 * rate_c, warmup_s)
        await reader.wait_for(warm_from + sent, timeout_s=120)
        for fraction in loads:
            rate = fraction * rate_c
            before = reader.count
            started = time.time()
            sent, real_s = await writer.write_at_rate(rate, seconds)
            await reader.wait_for(before + sent, timeout_s=120)
            ended = time.time()
            received, ts = reader.arrays()
            mine = slice(before, before + sent)
            latency = received[mine] - ts[mine] / 1000.0
            out.append(
                {
                    "load_fraction": fraction,
                    "offered_ticks_per_s": round(rate),
                    "achieved_ticks_per_s": round(sent / real_s),
                    "ticks": sent,
                    "predicted": int(min(reader.count - before, sent)),
                    **latency_summary(latency),
                    **sampler.window(started, ended),
                }
            )
            print(f"  live {fraction:.2f} x (c): {out[-1]}", flush=True)
            await asyncio.sleep(0.5)
    return out


async def soak(ctx: Context, kept: Any, rate: float, seconds: float) -> dict[str, Any]:
    """Half load for ``seconds``; RSS sampled throughout (memory flatness)."""
    _, sampler, _, topics, source = kept
    async with producer_for(ctx.bootstrap, ctx.idempotent) as producer:
        writer = TickWriter(source, producer, topics["input"])
        writer.next_tick = source.n_symbols * (source.prices.shape[1] * 3 // 4)
        writer.last_step_ts = int(time.time() * 1000) + 1
        started = time.time()
        sent, real_s = await writer.write_at_rate(rate, seconds)
    samples = [(s[0], s[2]) for s in sampler.samples if s[0] >= started]
    t = np.array([s[0] for s in samples]) - started
    rss = np.array([s[1] for s in samples], dtype=np.float64)
    half = len(rss) // 2
    slope = float(np.polyfit(t[half:], rss[half:], 1)[0]) if half > 2 else float("nan")
    return {
        "seconds": round(real_s, 1),
        "ticks": sent,
        "offered_ticks_per_s": round(rate),
        "rss_start_bytes": int(rss[0]),
        "rss_end_bytes": int(rss[-1]),
        "rss_max_bytes": int(rss.max()),
        "rss_slope_second_half_bytes_per_min": round(slope * 60),
    }


def phase_memory(ctx: Context) -> dict[str, Any]:
    topics = {"input": "unused", "output": "unused", "dlq": "unused"}
    child = ChildDaemon(
        ChildConfig(
            settings=ctx.child_config(topics),
            mode="memory",
            memory_symbols=ctx.plan.memory_symbols,
        ),
        ctx.work_dir / "daemon-memory.log",
    )
    try:
        return child.read_json_line()
    finally:
        child.stop()


# ============================================================================ run
def ensure_checkpoint(checkpoint_dir: Path | None, work_dir: Path) -> tuple[Path, str]:
    """The given checkpoint dir, or a new one: PriceGRU with seeded random weights."""
    from model.checkpoint import CheckpointMeta, new_version, promote, read_latest, save_checkpoint

    if checkpoint_dir is not None:
        version = read_latest(checkpoint_dir)
        if version is None:
            raise SystemExit(f"tickcast bench: no LATEST in {checkpoint_dir}")
        return checkpoint_dir, f"{checkpoint_dir} (LATEST = {version})"
    import torch

    from model.gru import ModelConfig, PriceGRU

    root = work_dir / "checkpoints"
    torch.manual_seed(7)
    model = PriceGRU(ModelConfig())
    # Random head weights: the GRU's output matters (cost is the same as a trained model).
    torch.nn.init.normal_(model.head.weight, std=0.5)
    torch.nn.init.normal_(model.head.bias, std=0.05)
    version = new_version()
    save_checkpoint(root, model, CheckpointMeta(version=version, architecture=model.config))
    promote(root, version)
    return root, "PriceGRU(1->64, window 60) with seeded random weights (seed 7), untrained"


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
    }


async def run_phases(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    plan = ctx.plan
    r = ctx.results
    print("(a) model ceiling ...", flush=True)
    r["a_ceiling"] = await asyncio.to_thread(phase_ceiling, ctx)
    per_symbol = WINDOW - 1 + (plan.predictions + plan.symbols - 1) // plan.symbols  # backlog
    live_room = int(max(plan.loads) * 200_000 * plan.live_seconds * len(plan.loads))
    live_room += int(0.5 * 200_000 * plan.warmup_seconds)
    live_room += int(100_000 * plan.soak_seconds)
    source = TickSource.build(plan.symbols, 2 * (per_symbol + live_room // plan.symbols + 1))
    r["data"] = source.note
    freeze_garbage_collector()

    # Steady state, not start-up: the JVM broker compiles its hot paths over its first
    # minute of load (measured at 20,000 ticks/s: its JIT threads took 0.48, 0.18, then
    # 0.08 cores in three 10 s windows), which (c) would otherwise pay alone.
    print("broker warm-up: the (c) drain twice over, not counted ...", flush=True)
    filling = plan.symbols * (WINDOW - 1)  # ticks before each symbol's first full window
    ticks_c = filling + plan.predictions
    warmup_ticks = filling + 2 * plan.predictions
    r["broker_warmup"], _ = await drain_backlog(
        ctx,
        "warmup",
        {"max_batch_size": plan.max_batch_size},
        source,
        warmup_ticks,
        fast=True,
        compile=None,
    )
    print(f"  {r['broker_warmup']}", flush=True)

    print("(b) naive baseline: daemon, max_batch_size=1, nn.GRU ...", flush=True)
    naive_ticks = filling + plan.naive_predictions
    r["b_naive"], _ = await drain_backlog(
        ctx, "naive", {"max_batch_size": 1}, source, naive_ticks, fast=False, compile=None
    )
    r["b_naive"]["how"] = "the daemon itself with max_batch_size=1 and nn.GRU (fast=False)"
    print(f"  {r['b_naive']}", flush=True)

    # One ~5 s drain on this VM moved by a fifth between runs minutes apart (52,253 and
    # 63,791 ticks/s in v12 and v13), so (c) is the median drain of several, each on a
    # fresh daemon; all rates are kept. The last daemon stays on for the live phases.
    print(f"(c) tickcast end to end: median of {plan.c_drains} drains ...", flush=True)
    compile = None if plan.compile == "none" else plan.compile
    drains: list[dict[str, Any]] = []
    for i in range(plan.c_drains):
        # (a) again just before: the VM's speed drifts over minutes, and (c)/(a) should
        # compare the two in the same stretch of it.
        await asyncio.to_thread(confirm_ceiling, ctx)
        drain, kept = await drain_backlog(
            ctx,
            "tickcast",
            {"max_batch_size": plan.max_batch_size},
            source,
            ticks_c,
            fast=True,
            compile=compile,
            keep=i == plan.c_drains - 1,
        )
        print(f"  {drain}", flush=True)
        drains.append(drain)
    forward = f"compiled ({compile})" if compile else "TorchScript"
    r["c_tickcast"] = {
        **sorted(drains, key=lambda d: d["predictions_per_s"])[len(drains) // 2],
        "drains_predictions_per_s": [d["predictions_per_s"] for d in drains],
        "forward": f"explicit GRU cell, {forward}",
    }
    child, sampler, reader, _, _ = kept
    try:
        rate_c = float(r["c_tickcast"]["predictions_per_s"])
        print(f"latency under offered load (after {plan.warmup_seconds:.0f} s at half load) ...")
        r["latency"] = await live_loads(
            ctx, kept, rate_c, plan.loads, plan.live_seconds, plan.warmup_seconds
        )
        if plan.soak_seconds:
            print(f"soak {plan.soak_seconds:.0f}s at half load ...", flush=True)
            r["soak"] = await soak(ctx, kept, 0.5 * rate_c, plan.soak_seconds)
    finally:
        sampler.stop()
        child.stop()
        await reader.stop()

    print(f"conflation: {plan.conflate_symbols} hot symbols ...", flush=True)
    hot = TickSource.build(
        plan.conflate_symbols, WINDOW + plan.conflate_ticks // plan.conflate_symbols + 2
    )
    conflate_ticks = plan.conflate_symbols * (WINDOW - 1) + plan.conflate_ticks
    r["conflation"], _ = await drain_backlog(
        ctx,
        "conflate",
        {"max_batch_size": plan.max_batch_size, "conflate": True},
        hot,
        conflate_ticks,
        fast=True,
        compile=None,
    )
    print(f"  {r['conflation']}", flush=True)

    if plan.restore_symbols and not ctx.idempotent:
        print("restore: skipped (its daemon and producers are idempotent; Tansu refuses them)")
    elif plan.restore_symbols:
        from daemon.bench_restore import measure_restore

        print(
            f"restore: {plan.restore_symbols:,} symbols x {plan.restore_ticks:,} ticks "
            "behind the committed offset ...",
            flush=True,
        )
        r["restore"] = await measure_restore(
            ctx.bootstrap,
            ctx.checkpoint_dir,
            symbols=plan.restore_symbols,
            ticks_per_symbol=plan.restore_ticks,
        )
        print(f"  {r['restore']}", flush=True)

    if plan.memory_symbols:
        print(f"memory: {plan.memory_symbols:,} symbols ...", flush=True)
        r["memory"] = await asyncio.to_thread(phase_memory, ctx)
        print(f"  {r['memory']}", flush=True)
    return r


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Ratios and target verdicts, computed from the measured numbers only."""
    a = float(results["a_ceiling"]["best"]["windows_per_s"])
    sweep_max = results["a_ceiling"]["best"].get("sweep_max_windows_per_s")
    targets = dict(TARGETS)
    if results["a_ceiling"].get("device") == "cuda":
        targets["serving_ceiling_windows_per_s"] = GPU_CEILING_WINDOWS_PER_S
    # --ceiling-only runs (a) alone: no end-to-end figures, so no ratios.
    b = float(results["b_naive"]["predictions_per_s"]) if "b_naive" in results else None
    c = float(results["c_tickcast"]["predictions_per_s"]) if "c_tickcast" in results else None
    half = next((x for x in results.get("latency", []) if x["load_fraction"] == 0.5), None)
    rss_1m = results.get("memory", {}).get("rss_bytes")
    restore = results.get("restore")
    figures = {
        "a_windows_per_s": a,
        "b_ticks_per_s": b,
        "c_ticks_per_s": c,
        "c_over_b": round(c / b, 2) if b and c else None,
        "c_over_a": round(c / a, 3) if c else None,
        # Against the sweep's single fastest sample, as (a) was taken until v15: not judged.
        "c_over_a_sweep_max": round(c / sweep_max, 3) if c and sweep_max else None,
        "p99_ms_at_half_load": half["p99_ms"] if half else None,
        "rss_1m_symbols_bytes": rss_1m,
        "serving_ceiling_windows_per_s": a,
        "restore_seconds": restore["subscribe_to_ready_seconds"] if restore else None,
    }
    met = {
        "c_over_b": b is not None and c is not None and c / b >= targets["c_over_b"],
        "c_over_a": c is not None and c / a >= targets["c_over_a"],
        "p99_ms_at_half_load": half is not None
        and half["p99_ms"] <= targets["p99_ms_at_half_load"],
        "rss_1m_symbols_bytes": rss_1m is not None and rss_1m <= targets["rss_1m_symbols_bytes"],
        "serving_ceiling_windows_per_s": a >= targets["serving_ceiling_windows_per_s"],
        # The 5 s target is for 10,000 symbols x 1,000 ticks; smaller runs are not judged.
        "restore_seconds": restore is not None
        and restore["symbols"] * restore["ticks_per_symbol"] >= 10_000_000
        and restore["restored_windows_exact"]
        and restore["subscribe_to_ready_seconds"] <= targets["restore_seconds"],
    }
    return {"figures": figures, "targets": targets, "met": met}


def render_table(report: dict[str, Any]) -> str:
    """The human-readable summary printed at the end of a run."""
    r, summary, machine = report["results"], report["summary"], report["machine"]
    f, met = summary["figures"], summary["met"]
    mib = 2**20

    def verdict(key: str, target: str) -> str:
        return f"{target} {'met' if met.get(key) else 'MISSED'}"

    def row(label: str, value: str, target: str = "") -> str:
        return f"{label:<46}{value:>18}  {target}".rstrip()

    a = r["a_ceiling"]
    ceiling_target = ">= 1,000,000" if a.get("device") == "cuda" else ">= 60,000"
    lines = [
        f"tickcast bench ({machine['cores']} cores, {machine['cpu_capability']}, "
        f"load average {machine['load_average_at_start']} -> {machine.get('load_average_at_end')})",
        f"data: {r['data']}",
        "",
        row("figure", "value", "target"),
        row(
            "(a) model ceiling, windows/s",
            f"{f['a_windows_per_s']:,.0f}",
            verdict("serving_ceiling_windows_per_s", ceiling_target),
        ),
        row("    best path / batch", f"{a['best']['path']} / {a['best']['batch']}"),
        row(
            "    median of re-measurements (sweep's max)",
            f"{', '.join(f'{x:,}' for x in a['best']['confirmations'])} "
            f"({a['best']['sweep_max_windows_per_s']:,})",
        ),
        row(
            "    FLOP fraction of measured sgemm peak",
            f"{a['flop_fraction_of_sgemm_peak'] or 0:.3f}",
        ),
    ]
    if "c_tickcast" in r:
        c = r["c_tickcast"]
        lines += [
            row("(b) naive end to end, ticks/s", f"{f['b_ticks_per_s']:,.0f}"),
            row("(c) tickcast end to end, ticks/s", f"{f['c_ticks_per_s']:,.0f}"),
        ]
        if len(c.get("drains_predictions_per_s", ())) > 1:
            rates = ", ".join(f"{x:,}" for x in c["drains_predictions_per_s"])
            lines.append(row("    median of the drains", rates))
        if "broker_warmup" in r:
            cold = r["broker_warmup"]["predictions_per_s"]
            lines.append(row("    the same on the cold broker (warm-up)", f"{cold:,.0f}"))
        lines += [
            row(
                "    every window predicted (distinct/expected)",
                f"{c['distinct_predictions']:,}/{c['windows_expected']:,}",
            ),
            row(
                "    daemon CPU cores / RSS MiB",
                f"{c['cpu_cores']:.2f} / {c['rss_max_bytes'] / mib:.0f}",
            ),
            row(
                "    machine cores busy / stolen by the hypervisor",
                f"{c['machine_busy_cores']:.2f} / {c['machine_stolen_cores']:.2f}",
            ),
            row("(c)/(b)", f"{f['c_over_b']:.1f}", verdict("c_over_b", ">= 20")),
            row("(c)/(a)", f"{f['c_over_a']:.3f}", verdict("c_over_a", ">= 0.6")),
        ]
        if f.get("c_over_a_sweep_max"):
            lines.append(
                row("    (c) / the sweep's max (not judged)", f"{f['c_over_a_sweep_max']:.3f}")
            )
    for load in r.get("latency", []):
        target = ""
        if load["load_fraction"] == 0.5:
            target = verdict("p99_ms_at_half_load", "p99 <= 50 ms")
        lines.append(
            row(
                f"latency ms p50/p99/max, {load['load_fraction']:.2f} x (c) "
                f"= {load['achieved_ticks_per_s']:,}/s",
                f"{load['p50_ms']:.1f}/{load['p99_ms']:.1f}/{load['max_ms']:.1f}",
                target,
            )
        )
    if "conflation" in r:
        lines.append(
            row(
                "conflation ingest, ticks/s (50 hot symbols)",
                f"{r['conflation']['ingest_ticks_per_s']:,}",
            )
        )
    if "memory" in r:
        m = r["memory"]
        lines.append(
            row(
                f"RSS MiB with {m['symbols']:,} symbols",
                f"{m['rss_bytes'] / mib:,.0f}",
                verdict("rss_1m_symbols_bytes", "<= 1,024"),
            )
        )
    if "restore" in r:
        x = r["restore"]
        lines.append(
            row(
                f"restore {x['symbols']:,} symbols x {x['ticks_per_symbol']:,} ticks, s",
                f"{x['subscribe_to_ready_seconds']:.2f}"
                + ("" if x["restored_windows_exact"] else " (NOT exact)"),
                verdict("restore_seconds", "<= 5 s at 10,000 x 1,000"),
            )
        )
    if "soak" in r:
        k = r["soak"]
        lines.append(
            row(
                f"soak {k['seconds']}s: RSS MiB start/end/max",
                f"{k['rss_start_bytes'] / mib:.0f}/{k['rss_end_bytes'] / mib:.0f}"
                f"/{k['rss_max_bytes'] / mib:.0f}",
            )
        )
    return "\n".join(lines)


def draw_plots(report: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    r = report["results"]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in r["a_ceiling"]["curves"].items():
        ax.plot([int(b) for b in curve], list(curve.values()), marker="o", label=name)
    if "c_tickcast" in r:
        ax.axhline(r["c_tickcast"]["predictions_per_s"], color="k", ls="--", label="(c) end to end")
    ax.set(xscale="log", xlabel="batch size", ylabel="windows/s", title="throughput vs batch size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(str(out_dir / "throughput_vs_batch.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if r.get("latency"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        x = [row["achieved_ticks_per_s"] for row in r["latency"]]
        for key in ("p50_ms", "p99_ms", "max_ms"):
            ax.plot(x, [row[key] for row in r["latency"]], marker="o", label=key[:-3])
        ax.set(xlabel="offered ticks/s", ylabel="ms", yscale="log", title="latency vs offered load")
        ax.legend()
        fig.tight_layout()
        paths.append(str(out_dir / "latency_vs_load.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``tickcast bench``."""
    parser.add_argument(
        "--bootstrap-servers", default=None, help="use this broker (default: start an embedded one)"
    )
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="serve LATEST from here (default: seeded random PriceGRU)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument(
        "--broker",
        choices=("kafka", "tansu"),
        default="kafka",
        help="the embedded broker: Apache Kafka (needs java) or Tansu (no Java; producers "
        "not idempotent, restore figure skipped)",
    )
    parser.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    parser.add_argument(
        "--ceiling-only",
        action="store_true",
        help="only (a), the model ceiling: no broker needed (e.g. a GPU machine without Java)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the full report here")
    parser.add_argument("--plot", type=Path, default=None, metavar="DIR", help="draw PNGs here")
    parser.add_argument(
        "--symbols",
        type=int,
        default=None,
        help="symbols for the memory figure (default 1,000,000; 0 skips)",
    )
    parser.add_argument(
        "--symbols-live", type=int, default=None, help="symbols in the Kafka phases (default 1000)"
    )
    parser.add_argument("--predictions", type=int, default=None, help="windows to score in (c)")
    parser.add_argument(
        "--c-drains",
        type=_at_least_one,
        default=None,
        help="(c) is the median of this many (default 3)",
    )
    parser.add_argument(
        "--naive-predictions", type=int, default=None, help="windows to score in (b)"
    )
    parser.add_argument("--live-seconds", type=float, default=None, help="seconds per offered load")
    parser.add_argument(
        "--max-batch-size", type=int, default=1024, help="the (c) daemon's max batch"
    )
    parser.add_argument(
        "--compile",
        choices=("none", "step", "loop"),
        default="none",
        help="torch.compile the (c) daemon's forward",
    )
    parser.add_argument(
        "--compile-loop",
        action="store_true",
        help="include the whole-loop compile in (a) (minutes)",
    )
    parser.add_argument(
        "--soak",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="half-load soak for memory flatness",
    )
    parser.add_argument(
        "--restore-symbols",
        type=int,
        default=None,
        help="symbols in the restore figure (default 10,000; 0 skips)",
    )
    parser.add_argument(
        "--restore-ticks", type=int, default=None, help="ticks per symbol behind the commit"
    )
    parser.add_argument(
        "--daemon-threads",
        type=int,
        default=None,
        help="torch intra-op threads of the (b)/(c) daemons (default: as tickcast serve)",
    )


def start_embedded_broker(kind: str, work_dir: Path) -> tuple[Any, str]:
    """A started broker on this machine (Apache Kafka, or Tansu without Java) and its note."""
    if kind == "tansu":
        from daemon.tansu import TansuBroker

        tansu = TansuBroker(work_dir / "tansu")
        tansu.start()
        return tansu, "embedded Tansu (no Java; in-memory storage; same machine)"
    from daemon.embedded_kafka import KafkaBroker

    kafka = KafkaBroker(work_dir / "kafka")
    kafka.start()
    return kafka, "embedded Apache Kafka (KRaft, same machine)"


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C: the finally blocks stop the child daemons and the
    embedded broker (the default action would leave them running, orphaned)."""

    def unwind(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_bench(args: argparse.Namespace) -> int:
    """Entry of ``tickcast bench``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    plan = Plan.from_args(args)
    with sigterm_unwinds(), tempfile.TemporaryDirectory(prefix="tickcast-bench-") as tmp:
        work_dir = Path(tmp)
        checkpoint_dir, checkpoint_note = ensure_checkpoint(args.checkpoint_dir, work_dir)
        report: dict[str, Any] = {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(),
            "plan": asdict(plan),
            "checkpoint": checkpoint_note,
        }
        broker = None
        bootstrap = args.bootstrap_servers
        if args.ceiling_only:
            report["broker"] = "none (--ceiling-only)"
        elif bootstrap is None:
            broker, report["broker"] = start_embedded_broker(args.broker, work_dir)
            bootstrap = broker.bootstrap
        else:
            report["broker"] = f"given: {bootstrap}"
        try:
            ctx = Context(
                bootstrap or "",
                checkpoint_dir,
                work_dir,
                args.device,
                plan,
                idempotent=args.broker != "tansu",
            )
            started = time.perf_counter()
            if args.ceiling_only:
                print("(a) model ceiling only ...", flush=True)
                report["results"] = {
                    "a_ceiling": phase_ceiling(ctx),
                    "data": "model ceiling only: windows cut from the real series, no broker",
                }
            else:
                report["results"] = asyncio.run(run_phases(ctx, args))
            report["wall_seconds"] = round(time.perf_counter() - started, 1)
        finally:
            if broker is not None:
                broker.stop()
        report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        report["summary"] = summarise(report["results"])
        if args.plot is not None:
            report["plots"] = draw_plots(report, args.plot)
    print()
    print(render_table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nreport: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1]))
