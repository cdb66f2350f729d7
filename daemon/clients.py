"""The daemon's Kafka clients, built from its settings: the input consumer and the
producers (predictions and dead letters, window snapshots)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from daemon import raw_records
from daemon.settings import Settings

logger = logging.getLogger(__name__)


def make_producer(settings: Settings, role: str, **tuning: Any) -> AIOKafkaProducer:
    """An acks=all producer (idempotent unless turned off) for one of the daemon's roles."""
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.client_id}-{role}",
        acks="all",
        enable_idempotence=settings.enable_idempotence,
        **settings.client_kwargs(),
        **tuning,
    )


def make_consumer(settings: Settings) -> AIOKafkaConsumer:
    """The input consumer: manual commits, read_committed, fetch sizes from settings; it
    hands over records as fetched, without a ConsumerRecord each (daemon.raw_records)."""
    return AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=settings.group_id,
        client_id=f"{settings.client_id}-consumer",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_min_bytes=settings.fetch_min_bytes,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=min(3_000, settings.session_timeout_ms // 3),
        value_deserializer=raw_records.raw_value,
        **settings.client_kwargs(),
    )


def transactional_id(settings: Settings) -> str:
    """The producer's transactional id in exactly-once mode.

    Must be unique per running instance. Set TICKCAST_TRANSACTIONAL_ID to a stable name
    per instance (e.g. the pod name of a StatefulSet) so that a restarted instance fences
    its own zombie; the default (host and pid) is unique but not stable across restarts.
    """
    if settings.transactional_id:
        return settings.transactional_id
    return f"{settings.group_id}-{socket.gethostname()}-{os.getpid()}"


def state_transactional_id(settings: Settings, partition: int) -> str:
    """The transactional id of state partition ``partition``'s writer: the same for every
    instance of the group, so the next owner of the partition fences the previous one."""
    return f"{settings.group_id}.{settings.state_topic}.{partition}"


async def stop_client(client: AIOKafkaConsumer | AIOKafkaProducer, timeout_s: float) -> None:
    """Stop a client within ``timeout_s``, logging instead of raising: the consumer leaves
    the group (waiting for a rebalance callback in progress), a producer flushes first,
    and an idempotent producer's flush never gives up while the broker is unreachable."""
    try:
        async with asyncio.timeout(max(0.0, timeout_s)):
            await client.stop()
    except TimeoutError:
        logger.warning("%s did not stop in time; leaving it", type(client).__name__)
    except Exception as exc:
        logger.warning("stopping %s failed: %s", type(client).__name__, exc)
