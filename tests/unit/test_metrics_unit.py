"""daemon.metrics.observe_many and summarize_many are exactly loops of Histogram.observe and
Summary.observe, only vectorised."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, Summary

from daemon.metrics import (
    BATCH_SIZE_BUCKETS,
    FAST_SECONDS_BUCKETS,
    LAG_SECONDS_BUCKETS,
    LATENCY_SECONDS_BUCKETS,
    DaemonMetrics,
    observe_many,
    summarize_many,
)
from daemon.ticks import BAD_TICK_REASONS


def samples(histogram: Histogram) -> dict[tuple[str, str], float]:
    """(sample name, le) -> value, for every bucket, _count and _sum."""
    out = {}
    for metric in histogram.collect():
        for s in metric.samples:
            if s.name.endswith("_created"):
                continue
            out[(s.name, s.labels.get("le", ""))] = s.value
    return out


def pair(buckets: tuple[float, ...]) -> tuple[Histogram, Histogram]:
    registry = CollectorRegistry()
    return (
        Histogram("looped", "h", buckets=buckets, registry=registry),
        Histogram("vectorised", "h", buckets=buckets, registry=registry),
    )


def renamed(values: dict[tuple[str, str], float], old: str) -> dict[tuple[str, str], float]:
    return {(name.replace(old, "h"), le): v for (name, le), v in values.items()}


@pytest.mark.parametrize(
    "buckets",
    [BATCH_SIZE_BUCKETS, FAST_SECONDS_BUCKETS, LATENCY_SECONDS_BUCKETS, LAG_SECONDS_BUCKETS],
)
@pytest.mark.parametrize("seed", range(5))
def test_observe_many_equals_a_loop_of_observe(buckets: tuple[float, ...], seed: int) -> None:
    rng = np.random.default_rng(seed)
    top = buckets[-1]
    values = np.concatenate(
        [
            rng.uniform(0, top * 1.5, 500),  # spread over every bucket and past the last
            rng.lognormal(np.log(top) - 6, 2, 500),  # mostly small, a long tail
            np.asarray(buckets, dtype=np.float64),  # exactly on the bounds: le is inclusive
            np.nextafter(np.asarray(buckets, dtype=np.float64), np.inf),  # just above
            np.zeros(3),
        ]
    )
    rng.shuffle(values)
    looped, vectorised = pair(buckets)
    for v in values.tolist():
        looped.observe(v)
    observe_many(vectorised, values)
    expected = renamed(samples(looped), "looped")
    got = renamed(samples(vectorised), "vectorised")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if key[0] == "h_sum":
            assert got[key] == pytest.approx(value, rel=1e-12)
        else:
            assert got[key] == value, key


def test_observe_many_of_nothing_changes_nothing() -> None:
    looped, vectorised = pair(BATCH_SIZE_BUCKETS)
    observe_many(vectorised, np.empty(0))
    assert renamed(samples(vectorised), "vectorised") == renamed(samples(looped), "looped")


def test_observe_many_accumulates_over_calls() -> None:
    looped, vectorised = pair(LATENCY_SECONDS_BUCKETS)
    rng = np.random.default_rng(42)
    for _ in range(10):
        chunk = rng.exponential(0.05, 37)
        for v in chunk.tolist():
            looped.observe(v)
        observe_many(vectorised, chunk)
    expected = renamed(samples(looped), "looped")
    got = renamed(samples(vectorised), "vectorised")
    assert {k: v for k, v in got.items() if k[0] != "h_sum"} == {
        k: v for k, v in expected.items() if k[0] != "h_sum"
    }
    assert got[("h_sum", "")] == pytest.approx(expected[("h_sum", "")], rel=1e-12)


def test_summarize_many_equals_a_loop_of_observe() -> None:
    registry = CollectorRegistry()
    looped = Summary("looped", "s", ["forecaster"], registry=registry).labels("gru")
    vectorised = Summary("vectorised", "s", ["forecaster"], registry=registry).labels("gru")
    values = np.random.default_rng(7).exponential(2.0, size=1000)
    for chunk in np.array_split(values, 7):
        for v in chunk.tolist():
            looped.observe(v)
        summarize_many(vectorised, chunk)
    summarize_many(vectorised, np.empty(0))
    get = registry.get_sample_value
    for suffix in ("_count", "_sum"):
        want = get("looped" + suffix, {"forecaster": "gru"})
        assert want is not None and want > 0
        assert get("vectorised" + suffix, {"forecaster": "gru"}) == pytest.approx(want)


def test_every_labelled_counter_starts_at_zero_for_each_known_label() -> None:
    """rate() and increase() need a series before its first event, or the first bad tick,
    drop or rejected checkpoint after a start never shows on the dashboard."""
    registry = DaemonMetrics(process=False).registry
    expected = [
        *(("tickcast_bad_ticks_total", {"reason": r}) for r in BAD_TICK_REASONS),
        ("tickcast_ticks_dropped_total", {"reason": "not_newer"}),
        ("tickcast_model_reloads_total", {"result": "success"}),
        ("tickcast_model_reloads_total", {"result": "rejected"}),
        *(("tickcast_offset_commits_total", {"result": r}) for r in ("committed", "failed")),
    ]
    for name, labels in expected:
        assert registry.get_sample_value(name, labels) == 0.0, (name, labels)
    assert "unreadable" in BAD_TICK_REASONS
