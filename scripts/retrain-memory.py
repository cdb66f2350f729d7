"""Peak memory of ``tickcast retrain --from-kafka`` against the number of ticks it reads.

Starts the embedded Apache Kafka broker (or uses ``--bootstrap``), fills a fresh topic with
N real ticks (the bundled NASDAQ and S&P 500 daily closes, repeated under as many symbols
as N needs), then runs one retrain per N in a child process (one epoch, ``--max-ticks 0``)
and reports the child's peak RSS. Usage::

    python scripts/retrain-memory.py 250000 500000 [--json FILE]

The retrain of N ticks holds N windows, so memory grows with N; the slope between two
sizes is the cost per tick, free of the fixed cost of Python, torch and the model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from uuid import uuid4

import orjson
from aiokafka import AIOKafkaProducer

from daemon.embedded_kafka import KafkaBroker, create_topics
from model.data import load_many


async def fill(bootstrap: str, topic: str, ticks: int) -> None:
    """``ticks`` real ticks: the two daily series again and again, one symbol per copy."""
    series = load_many(["dataset:nasdaq", "dataset:sp500"])
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20, acks=1
    )
    await producer.start()
    try:
        sent, copy = 0, 0
        while sent < ticks:
            one = series[copy % len(series)]
            symbol = f"{one.symbol}-{copy}"
            rows = zip(one.prices.tolist(), one.ts.tolist(), strict=True)
            for price, ts in list(rows)[: ticks - sent]:
                value = orjson.dumps({"symbol": symbol, "price": price, "ts": ts})
                await producer.send(topic, value=value, key=symbol.encode())
                sent += 1
            copy += 1
        await producer.flush()
    finally:
        await producer.stop()


def peak_rss_of_retrain(bootstrap: str, topic: str, checkpoint_dir: Path) -> tuple[float, float]:
    """Peak RSS (MiB) and wall time (s) of one ``python -m model --from-kafka`` child."""
    argv = [sys.executable, "-m", "model", "--from-kafka", "--bootstrap-servers", bootstrap]
    argv += ["--input-topic", topic, "--checkpoint-dir", str(checkpoint_dir), "--max-ticks", "0"]
    argv += ["--split", "time", "--epochs", "1", "--no-progress", "--device", "cpu"]
    started = time.monotonic()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    # wait4 gives this child's own rusage: RUSAGE_CHILDREN would be the largest of every
    # child so far, the broker's storage formatter included.
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise subprocess.CalledProcessError(child.returncode, argv)
    return usage.ru_maxrss / 1024, time.monotonic() - started  # ru_maxrss: KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ticks", type=int, nargs="+", help="ticks to read, one retrain each")
    parser.add_argument("--bootstrap", help="an existing broker (default: start one)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        broker = None if args.bootstrap else KafkaBroker(Path(work) / "kafka")
        if broker is not None:
            broker.start()
        bootstrap = args.bootstrap or broker.bootstrap  # type: ignore[union-attr]
        results = []
        try:
            for ticks in sorted(args.ticks):
                topic = f"retrain-memory-{uuid4().hex[:8]}"
                asyncio.run(create_topics(bootstrap, [topic], partitions=3))
                asyncio.run(fill(bootstrap, topic, ticks))
                rss, seconds = peak_rss_of_retrain(bootstrap, topic, Path(work) / topic)
                results.append({"ticks": ticks, "peak_rss_mib": round(rss), "seconds": seconds})
                print(f"{ticks:>10,} ticks: peak RSS {rss:,.0f} MiB, {seconds:.0f} s", flush=True)
        finally:
            if broker is not None:
                broker.stop()
    if len(results) > 1:
        first, last = results[0], results[-1]
        slope = (last["peak_rss_mib"] - first["peak_rss_mib"]) * 2**20
        per_tick = slope / (last["ticks"] - first["ticks"])
        print(f"slope: {per_tick:,.0f} bytes per tick read")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
