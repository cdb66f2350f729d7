"""``tickcast bench``: its arguments, the embedded broker, and the run itself."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from daemon.bench.ceiling import phase_ceiling
from daemon.bench.child import stop_children
from daemon.bench.phases import ensure_checkpoint, run_phases
from daemon.bench.plan import Context, Plan
from daemon.bench.report import code_version, draw_plots, machine_info, render_table, summarise


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
        "--half-load-windows",
        type=_at_least_one,
        default=None,
        help="times the judged half load is offered; its latency pools them (default 3)",
    )
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
    try:
        plan = Plan.from_args(args)
    except ValueError as exc:  # a device this machine lacks
        print(f"tickcast bench: --device: {exc}", file=sys.stderr)
        return 2
    with sigterm_unwinds(), tempfile.TemporaryDirectory(prefix="tickcast-bench-") as tmp:
        work_dir = Path(tmp)
        checkpoint_dir, checkpoint_note = ensure_checkpoint(args.checkpoint_dir, work_dir)
        report: dict[str, Any] = {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "code": code_version(),
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
            stop_children()
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
