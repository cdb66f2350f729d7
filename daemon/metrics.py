"""The daemon's Prometheus metrics, all on one injected registry.

Names follow ``tickcast_<noun>_<unit>``: counters end in ``_total``, durations are
histograms in seconds. No metric has a per-symbol label: symbols are unbounded.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    Summary,
)
from prometheus_client.gc_collector import GCCollector

from daemon.ticks import BAD_TICK_REASONS

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
FAST_SECONDS_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
LATENCY_SECONDS_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
LAG_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 3600.0, 86400.0)


class DaemonMetrics:
    """Every metric the daemon exports. Tests build one on a fresh ``CollectorRegistry``."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

        # Flow
        self.ticks_consumed = Counter(
            "tickcast_ticks_consumed_total", "Records read from the input topic.", registry=r
        )
        self.bad_ticks = Counter(
            "tickcast_bad_ticks_total",
            "Ticks that could not be used, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in BAD_TICK_REASONS:
            self.bad_ticks.labels(reason)  # at 0, so the first of each shows in rate()
        self.dead_letters = Counter(
            "tickcast_dead_letter_records_total",
            "Records written to the dead-letter topic.",
            registry=r,
        )
        self.ticks_dropped = Counter(
            "tickcast_ticks_dropped_total",
            "Valid ticks dropped without a prediction, by reason (not_newer: ts not after the "
            "symbol's last tick, e.g. a redelivery).",
            ["reason"],
            registry=r,
        )
        self.ticks_dropped.labels("not_newer")
        self.ticks_warming_up = Counter(
            "tickcast_ticks_warming_up_total",
            "Valid ticks kept in a symbol's window before it is full: no prediction for them "
            "(the first window_length - 1 ticks of a symbol, again after its partition moved "
            "without a snapshot).",
            registry=r,
        )
        self.ticks_conflated = Counter(
            "tickcast_ticks_conflated_total",
            "Windows skipped because a newer window of the same symbol was queued (conflation).",
            registry=r,
        )
        self.predictions_published = Counter(
            "tickcast_predictions_published_total",
            "Predictions acknowledged by the broker.",
            registry=r,
        )
        self.offset_commits = Counter(
            "tickcast_offset_commits_total",
            "Input offset commits (at-least-once; exactly-once commits inside each "
            "transaction), by result: committed, failed (after retries: the ticks are "
            "redelivered), revoked (the partitions moved to another instance first).",
            ["result"],
            registry=r,
        )
        for result in ("committed", "failed", "revoked"):
            self.offset_commits.labels(result=result)
        self.send_retries = Counter(
            "tickcast_send_retries_total",
            "Sends to an output topic (predictions, dead letters) that failed and are being "
            "retried, by topic: rising for long means every partition waits behind them.",
            ["topic"],
            registry=r,
        )
        self.snapshot_symbols = Counter(
            "tickcast_snapshot_symbols_total",
            "Symbol windows written to the state topic.",
            registry=r,
        )
        self.state_writers_dropped = Counter(
            "tickcast_state_writers_dropped_total",
            "State partition writers dropped after failing (fenced by a newer owner, or "
            "broken); their partitions get no snapshots until assigned here again.",
            registry=r,
        )
        self.snapshot_unsaved_symbols = Gauge(
            "tickcast_snapshot_unsaved_symbols",
            "Changed symbols the last snapshot round left for later ones "
            "(rounds save at most TICKCAST_SNAPSHOT_MAX_SYMBOLS).",
            registry=r,
        )
        self.restored_snapshots = Counter(
            "tickcast_restored_snapshots_total",
            "Symbol windows loaded from the state topic after a partition assignment.",
            registry=r,
        )
        self.restored_ticks = Counter(
            "tickcast_restored_ticks_total",
            "Ticks replayed into windows after a partition assignment (not scored).",
            registry=r,
        )

        # Latency and batching
        self.batch_size = Histogram(
            "tickcast_batch_size",
            "Windows scored per forward pass.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "tickcast_inference_seconds",
            "Time of one batched forward pass, scaling included.",
            buckets=FAST_SECONDS_BUCKETS,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "tickcast_end_to_end_seconds",
            "Tick consumed to its prediction acknowledged.",
            buckets=LATENCY_SECONDS_BUCKETS,
            registry=r,
        )
        self.event_time_lag_seconds = Histogram(
            "tickcast_event_time_lag_seconds",
            "Prediction published minus the tick's event time.",
            buckets=LAG_SECONDS_BUCKETS,
            registry=r,
        )
        self.restore_seconds = Histogram(
            "tickcast_restore_seconds",
            "Partition assigned to its windows restored and scoring (time to first prediction).",
            buckets=LATENCY_SECONDS_BUCKETS,
            registry=r,
        )

        # State
        self.consumer_lag = Gauge(
            "tickcast_consumer_lag_records",
            "High watermark minus position, per input partition.",
            ["partition"],
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "tickcast_assigned_partitions",
            "Input partitions assigned to this instance.",
            registry=r,
        )
        self.restoring_partitions = Gauge(
            "tickcast_restoring_partitions",
            "Assigned input partitions paused while their windows are restored.",
            registry=r,
        )
        self.symbols_tracked = Gauge(
            "tickcast_symbols_tracked", "Symbols with a window in memory.", registry=r
        )
        self.inflight_windows = Gauge(
            "tickcast_inflight_windows",
            "Windows (and dead letters) queued or being scored, not yet acknowledged.",
            registry=r,
        )
        self.fetch_paused = Gauge(
            "tickcast_fetch_paused", "1 while fetching is paused for backpressure.", registry=r
        )

        # Model
        self.model_info = Info(
            "tickcast_model", "The model version in service and its device.", registry=r
        )
        self.model_age_seconds = Gauge(
            "tickcast_model_age_seconds",
            "Seconds since the serving checkpoint was created.",
            registry=r,
        )
        self.model_reloads = Counter(
            "tickcast_model_reloads_total",
            "Checkpoint swap attempts, by result.",
            ["result"],
            registry=r,
        )
        for result in ("success", "rejected"):
            self.model_reloads.labels(result)
        # Live accuracy: |prediction - realised next price| for the GRU and for the naive
        # forecast (last price). rate(_sum)/rate(_count) gives a rolling MAE per forecaster.
        self.live_abs_error = Summary(
            "tickcast_live_absolute_error",
            "Absolute error of each prediction once its symbol's next tick arrives, by forecaster.",
            ["forecaster"],
            registry=r,
        )


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for every v, in one vectorised step.

    A per-value ``observe`` costs about a microsecond of Python; at tens of thousands of
    predictions a second that adds up. This counts bucket hits with ``np.searchsorted``
    and adds them in one call per bucket (prometheus_client's buckets are
    non-cumulative internally; exposition makes them cumulative).
    """
    if len(values) == 0:
        return
    upper_bounds = np.asarray(histogram._upper_bounds)
    hits = np.bincount(
        np.searchsorted(upper_bounds, values, side="left"), minlength=len(upper_bounds)
    )
    for bucket, count in zip(histogram._buckets, hits.tolist(), strict=False):
        if count:
            bucket.inc(count)
    histogram._sum.inc(float(values.sum()))


def summarize_many(summary: Summary, values: np.ndarray) -> None:
    """``summary.observe(v)`` for every v, in one step: a Summary keeps only a count and a
    sum, so this adds ``len(values)`` and ``values.sum()`` (private fields, as in
    :func:`observe_many`; a unit test holds both to a loop of the public call)."""
    if len(values) == 0:
        return
    summary._count.inc(len(values))
    summary._sum.inc(float(values.sum()))
