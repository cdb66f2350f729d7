"""All of the daemon's settings, read once at the edge (environment, then CLI flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from model.kafka_access import KafkaAccess

# The windows' order check packs a fetch's symbols into one int64 range, each spanning up
# to the largest valid ts (1e13 ms): past ~460,000 symbols in one fetch that overflows.
MAX_FETCH_RECORDS = 100_000


class Settings(KafkaAccess):
    """``TICKCAST_*`` environment variables; CLI flags of the same name override them.

    The connection fields (bootstrap servers, input topic, security) come from
    :class:`~model.kafka_access.KafkaAccess`, which the retrain job reads too.
    """

    model_config = SettingsConfigDict(
        env_prefix="TICKCAST_",
        env_nested_delimiter="__",
        frozen=True,
        extra="ignore",
    )

    # Kafka (and the connection fields of KafkaAccess)
    output_topic: str = "predictions"
    dlq_topic: str = "ticks.dlq"
    # Compacted, co-partitioned with the input topic; snapshots are off when it is missing.
    state_topic: str = "ticks.state"
    snapshot_interval_s: float = Field(default=10.0, ge=0)  # 0 turns snapshots off
    # Symbols one snapshot round copies at most (~280 B each: with 1,000,000 symbols the
    # daemon stays within 1 GiB while it writes them); more changed ones wait for the next
    # round, taken as soon as this one is written.
    snapshot_max_symbols: int = Field(default=25_000, ge=1)
    # Each state partition written by its own transactional producer, so a previous
    # owner's late write is fenced off (daemon/state_store.py). Needs idempotence (both
    # rest on InitProducerId): off with it. Turn off where transactional ids are refused.
    state_fencing: bool = True
    group_id: str = "tickcast"
    client_id: str = "tickcast"
    delivery: Literal["at_least_once", "exactly_once"] = "at_least_once"
    transactional_id: str | None = None  # exactly_once: stable and unique per instance
    # Off only for brokers without InitProducerId (e.g. Tansu in the demo).
    enable_idempotence: bool = True

    # Model
    checkpoint_dir: Path = Path("./checkpoints")
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    checkpoint_poll_s: float = Field(default=2.0, gt=0)
    # CPU forward: "fast" (GRU cell loop under TorchScript), "compiled" (its step under
    # torch.compile, built in the background; "fast" until ready), "reference" (nn.GRU).
    inference: Literal["fast", "compiled", "reference"] = "fast"
    # Batches scored at once in worker threads (0: one per core, at most 8, on CPU; CUDA
    # and "compiled" score one at a time) and torch intra-op threads per batch (0: 1
    # beside several workers, else half the cores, 1 to 8).
    inference_workers: int = Field(default=0, ge=0, le=64)
    torch_threads: int = Field(default=0, ge=0)
    # Linux: the inference threads run this much nicer than the event loop. 0 by default:
    # niced, a forward pass waits behind every other process on the machine (a broker on
    # the same box: half-load p99 259-506 ms at nice 10 vs 83-132 ms at 0); 10 favours
    # backlog drains, whose event loop then keeps its core (README, Performance).
    inference_nice: int = Field(default=0, ge=0, le=19)

    # Batching and flow control
    max_batch_size: int = Field(default=1024, ge=1, le=65536)
    # While the consumer is caught up (its last fetch was not full), batches stop at this
    # size: shorter forward passes, shorter waits; a backlog drains in MAX_BATCH_SIZE ones.
    live_batch_size: int = Field(default=256, ge=1, le=65536)
    # Short: a fetch already gathers up to FETCH_MAX_WAIT_MS of ticks into one chunk.
    max_batch_delay_ms: float = Field(default=1.0, ge=0)
    fetch_max_records: int = Field(default=5000, ge=1, le=MAX_FETCH_RECORDS)
    # The broker answers a fetch once it has this many bytes, or after this wait: under
    # load, fewer and fuller fetches (Kafka's own defaults, 1 byte / 500 ms, answer every
    # fetch with whatever just arrived: a few ticks per request round trip).
    fetch_min_bytes: int = Field(default=65536, ge=1)
    fetch_max_wait_ms: int = Field(default=10, ge=0)
    # Group session (aiokafka's default): how long a crashed member's partitions wait before
    # they move. Restores run in the background and heartbeat, so they need no longer one.
    session_timeout_ms: int = Field(default=10_000, ge=6_000, le=1_800_000)
    max_inflight_batches: int = Field(default=8, ge=1)
    # At-least-once: acknowledged offsets are committed together at most this often
    # (a crash redelivers at most this much; Kafka Streams' exactly-once default is 100).
    commit_interval_ms: float = Field(default=100.0, ge=0)
    conflate: bool = False

    # Input validation: max_tick_bytes and max_symbol_length come from KafkaAccess, which
    # the retrain job reads too.
    # A dead letter carries at most this much of the original value (the rest stays in the
    # input topic at tickcast.source): an oversized original plus headers could exceed the
    # broker's message limit, and a rejected dead letter would be resent forever.
    dlq_max_value_bytes: int = Field(default=256 * 1024, ge=0)

    # HTTP and lifecycle
    metrics_port: int = Field(default=9400, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    shutdown_timeout_s: float = Field(default=10.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _exactly_once_needs_idempotence(self) -> Settings:
        if self.delivery == "exactly_once" and not self.enable_idempotence:
            raise ValueError(
                "TICKCAST_DELIVERY=exactly_once needs TICKCAST_ENABLE_IDEMPOTENCE=true"
            )
        if self.inference == "compiled" and self.inference_workers > 1:
            raise ValueError(
                "TICKCAST_INFERENCE=compiled scores one batch at a time; "
                "leave TICKCAST_INFERENCE_WORKERS at 0 or 1"
            )
        return self
