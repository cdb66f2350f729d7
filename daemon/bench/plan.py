"""What one bench run does (:class:`Plan`), the state its phases share (:class:`Context`)
and the constants they agree on."""

from __future__ import annotations

import argparse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daemon.bench.ceiling import CeilingProbe


REAL_SERIES = (
    "dataset:nasdaq",
    "dataset:sp500",
    "dataset:goog",
    "dataset:eurusd",
    "dataset:btcusd",
)
BATCH_SIZES = (1, 16, 64, 256, 512, 1024, 2048, 4096)
GPU_BATCH_SIZES = (*BATCH_SIZES, 16_384, 65_536)  # up to the largest CUDA bucket
WINDOW = 60
PARTITIONS = 3  # of the bench's input and output topics
COMMIT_POLL_FINE_S = 0.01  # how closely a drain's end is timed
COMMIT_POLL_COARSE_S = 0.25
HALF_LOAD = 0.5  # the load fraction whose p99 is judged


@dataclass(frozen=True)
class Plan:
    """How much of everything one run does (``--quick`` shrinks it)."""

    symbols: int
    naive_predictions: int
    predictions: int
    live_seconds: float
    warmup_seconds: float  # half load before the latency figures, not measured
    loads: tuple[float, ...]
    # The judged half load is offered this many times, spread between the other loads, and
    # its latency is taken over all of them: one 10 s window on this VM gave a p99 anywhere
    # from 93 to 723 ms minutes apart (same code, same broker).
    half_load_windows: int
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
        """The plan for ``args``; ValueError (a clear message) for a device this machine
        lacks (``cuda`` without a GPU) or does not know. ``auto`` is CPU without a GPU."""
        from model.train import resolve_device

        quick = bool(args.quick)
        on_gpu = resolve_device(args.device).type == "cuda"  # "auto" included
        return Plan(
            symbols=args.symbols_live or (100 if quick else 1000),
            naive_predictions=args.naive_predictions or (100 if quick else 1000),
            predictions=args.predictions or (10_000 if quick else 300_000),
            live_seconds=args.live_seconds or (2.0 if quick else 10.0),
            warmup_seconds=2.0 if quick else 20.0,
            loads=(0.5,) if quick else (0.25, 0.5, 0.75, 1.0),
            half_load_windows=args.half_load_windows or (2 if quick else 3),
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


def latency_schedule(loads: tuple[float, ...], half_load_windows: int) -> list[float]:
    """The load fractions in the order they are offered: HALF_LOAD ``half_load_windows``
    times (when it is among ``loads``), alternating with the others while both last, so
    its windows sample different minutes of the VM."""
    others = [f for f in loads if f != HALF_LOAD]
    halves = half_load_windows if HALF_LOAD in loads else 0
    schedule: list[float] = []
    for i in range(max(halves, len(others))):
        if i < halves:
            schedule.append(HALF_LOAD)
        if i < len(others):
            schedule.append(others[i])
    return schedule


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
        if self.idempotent:  # Apache Kafka: daemons snapshot their windows, as deployed
            topics["state"] = f"bench-{name}-state-{suffix}"
            await create_topics(
                self.bootstrap, [topics["state"]], partitions, {"cleanup.policy": "compact"}
            )
        return topics

    def child_config(self, topics: dict[str, str], **settings: Any) -> dict[str, Any]:
        return {
            "bootstrap_servers": self.bootstrap,
            "input_topic": topics["input"],
            "output_topic": topics["output"],
            "dlq_topic": topics["dlq"],
            # Without one the daemon runs with window snapshots off (it logs so).
            **({"state_topic": topics["state"]} if "state" in topics else {}),
            "group_id": f"bench-{uuid.uuid4().hex[:8]}",
            "checkpoint_dir": str(self.checkpoint_dir),
            "device": self.device,
            "checkpoint_poll_s": 30.0,
            "log_level": "WARNING",
            "enable_idempotence": self.idempotent,
            **settings,
        }
