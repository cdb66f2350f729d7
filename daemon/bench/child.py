"""Daemons under test run as child processes (``python -m daemon.bench CONFIG``), so their
CPU time and RSS are their own; also the 1,000,000-symbol memory probe."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from daemon.bench.plan import WINDOW


@dataclass
class ChildConfig:
    """What a child daemon runs: settings overrides plus predictor options."""

    settings: dict[str, Any]
    fast: bool = True
    compile: str | None = None
    threads: int | None = None
    mode: str = "serve"  # or "memory"
    memory_symbols: int = 0


def child_main(config_json: str) -> int:
    """Entry of ``python -m daemon.bench CONFIG``: one daemon (or the memory probe)."""
    import torch
    from prometheus_client import CollectorRegistry

    from daemon.inference import inference_threads, inference_workers
    from daemon.metrics import DaemonMetrics
    from daemon.predictor import load_predictor, resolve_device
    from daemon.service import TickcastService
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
    asyncio.run(_serve_reporting_port(service))
    return 0


async def _serve_reporting_port(service: Any) -> None:
    """Serve, and print the metrics port as a JSON line once the service has bound it
    (port 0: the system picks one, so no other process can take it first)."""
    serving = asyncio.create_task(service.serve())
    while service.metrics_port is None:  # binding is the first step of its start-up
        finished, _ = await asyncio.wait({serving}, timeout=0.01)
        if finished:  # failed (or stopped) before it bound the port
            break
    print(json.dumps({"metrics_port": service.metrics_port}), flush=True)
    await serving


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
    # With the state topic, the first snapshot after start finds every window changed: it
    # saves them in rounds of SNAPSHOT_MAX_SYMBOLS, each encoded and sent a chunk at a time.
    from daemon.state_store import WRITE_CHUNK_SYMBOLS, encode_snapshot

    first_round = windows.take_snapshot({0: 1}, service.settings.snapshot_max_symbols).snapshot
    records = encode_snapshot(first_round.rows(0, WRITE_CHUNK_SYMBOLS))
    with_snapshot = _rss_bytes()
    del first_round, records
    return {
        "symbols": len(windows),
        "rss_bytes": rss,
        "rss_empty_service_bytes": empty_rss,
        "windows_array_bytes": int(windows.nbytes),
        "bytes_per_symbol": round((rss - empty_rss) / max(n_symbols, 1), 1),
        "rss_while_snapshotting_bytes": with_snapshot,
        "method": "service built (not started: no Kafka clients or batches in flight); "
        "windows filled directly, then one real apply() per symbol and one scored batch; "
        "RSS = the child's real RSS; then the first snapshot round taken (every window "
        "changed: TICKCAST_SNAPSHOT_MAX_SYMBOLS of them) and its first write chunk encoded "
        "(what a daemon with the state topic holds while writing its first snapshot)",
    }


# Every child started and not yet stopped: a SIGTERM landing between a child's start and
# the try block of the phase that owns it would otherwise leave it running, orphaned.
_running: set[ChildDaemon] = set()


def stop_children() -> None:
    """Stop every child daemon still running (the bench's last finally block)."""
    for child in list(_running):
        child.stop()


class ChildDaemon:
    """A daemon in a child process, its readiness, and its CPU/RSS (from /proc)."""

    def __init__(self, config: ChildConfig, log_path: Path) -> None:
        self.config = config
        self.port: int | None = None  # the child binds port 0 and reports it (wait_ready)
        config.settings.update(metrics_port=0, metrics_host="127.0.0.1")
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daemon.bench", json.dumps(asdict(config))],
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        _running.add(self)
        self.compile_s: float | None = None

    def read_json_line(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"bench child exited: {self.log_path.read_text()[-3000:]}")
        return dict(json.loads(line))

    async def wait_ready(self, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        if self.config.compile:
            info = await asyncio.to_thread(self.read_json_line)
            self.compile_s = float(info["compile_s"])
        reported = await asyncio.wait_for(
            asyncio.to_thread(self.read_json_line), max(deadline - time.monotonic(), 1.0)
        )
        if reported.get("metrics_port") is None:
            raise RuntimeError(f"daemon did not serve: {self.log_path.read_text()[-3000:]}")
        self.port = int(reported["metrics_port"])
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
        _running.discard(self)
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
