"""How the daemon configures its Kafka clients (constructed only; nothing connects)."""

from __future__ import annotations

from daemon.clients import make_consumer
from daemon.settings import Settings


async def test_consumer_fetch_sizes_follow_the_settings() -> None:
    consumer = make_consumer(Settings(fetch_min_bytes=12345, fetch_max_wait_ms=7))
    try:
        assert consumer._fetch_min_bytes == 12345
        assert consumer._fetch_max_wait_ms == 7
    finally:
        await consumer.stop()


async def test_consumer_defaults_trade_a_short_wait_for_fuller_fetches() -> None:
    consumer = make_consumer(Settings())
    try:
        assert consumer._fetch_min_bytes == 65536
        assert consumer._fetch_max_wait_ms == 10
        # Offsets are committed by the daemon, after the predictions are acknowledged.
        assert consumer._enable_auto_commit is False
        assert consumer._isolation_level == "read_committed"
    finally:
        await consumer.stop()


async def test_a_longer_session_for_slow_restores() -> None:
    # A restore runs inside the rebalance, without heartbeats: the session must outlast it.
    consumer = make_consumer(Settings(session_timeout_ms=60_000))
    try:
        assert consumer._session_timeout_ms == 60_000
        assert consumer._heartbeat_interval_ms == 3_000
    finally:
        await consumer.stop()
    default = make_consumer(Settings())
    try:
        assert (default._session_timeout_ms, default._heartbeat_interval_ms) == (10_000, 3_000)
    finally:
        await default.stop()
