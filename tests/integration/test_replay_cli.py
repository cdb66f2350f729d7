"""``tickcast replay`` produces real series as ticks, interleaved by time and keyed by symbol."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import orjson
import pytest

from model.data import load_many
from tests.support.daemon import consume_raw

pytestmark = pytest.mark.kafka


async def test_replay_interleaves_real_series_by_time(kafka_bootstrap, topic_factory):
    topic = await topic_factory(partitions=1)
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable, "-c", "from daemon.cli import main; raise SystemExit(main())",
            "replay", "--data", "dataset:nasdaq", "--data", "dataset:sp500",
            "--limit", "300", "--bootstrap-servers", kafka_bootstrap, "--input-topic", topic,
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "replayed 300 ticks of 2 symbols" in done.stdout
    records = await consume_raw(kafka_bootstrap, topic, 300)
    ticks = [orjson.loads(r.value) for r in records]
    assert len(ticks) == 300
    assert all(r.key == t["symbol"].encode() for r, t in zip(records, ticks, strict=True))
    assert [t["ts"] for t in ticks] == sorted(t["ts"] for t in ticks)  # merged by time
    nasdaq, sp500 = load_many(["dataset:nasdaq", "dataset:sp500"])
    for series in (nasdaq, sp500):
        mine = [t for t in ticks if t["symbol"] == series.symbol]
        assert [t["price"] for t in mine] == series.prices[: len(mine)].tolist()
        assert [t["ts"] for t in mine] == series.ts[: len(mine)].tolist()


def test_replay_rejects_a_bad_rate_and_unknown_data():
    cli = [sys.executable, "-c", "from daemon.cli import main; raise SystemExit(main())"]
    bad_rate = subprocess.run(
        [*cli, "replay", "--data", "dataset:nasdaq", "--rate", "-3"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad_rate.returncode == 2
    assert "--rate" in bad_rate.stderr
    unknown = subprocess.run(
        [*cli, "replay", "--data", "dataset:nope"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert unknown.returncode == 2
    assert "nope" in unknown.stderr
