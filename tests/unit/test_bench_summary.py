"""The bench's verdicts are computed from the measured numbers, per device."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from daemon.bench.ceiling import CeilingProbe, confirm_ceiling
from daemon.bench.load import latency_summary
from daemon.bench.phases import pool_windows
from daemon.bench.plan import Context, Plan, latency_schedule
from daemon.bench.report import render_table, summarise


def ceiling(windows_per_s: float, device: str) -> dict[str, Any]:
    return {
        "device": device,
        "best": {
            "path": "p",
            "batch": 256,
            "windows_per_s": windows_per_s,
            "sweep_max_windows_per_s": windows_per_s * 1.1,
            "confirmations": [windows_per_s],
        },
        "flop_fraction_of_sgemm_peak": 0.4,
    }


def test_a_gpu_ceiling_is_judged_against_a_million_windows_per_second() -> None:
    assert summarise({"a_ceiling": ceiling(1_200_000, "cuda")})["met"][
        "serving_ceiling_windows_per_s"
    ]
    assert not summarise({"a_ceiling": ceiling(900_000, "cuda")})["met"][
        "serving_ceiling_windows_per_s"
    ]
    # The same 900,000 on CPU clears the CPU target of 60,000.
    assert summarise({"a_ceiling": ceiling(900_000, "cpu")})["met"]["serving_ceiling_windows_per_s"]
    # The report names the target it judged by.
    assert (
        summarise({"a_ceiling": ceiling(1, "cuda")})["targets"]["serving_ceiling_windows_per_s"]
        == 1_000_000
    )
    assert (
        summarise({"a_ceiling": ceiling(1, "cpu")})["targets"]["serving_ceiling_windows_per_s"]
        == 60_000
    )


def test_a_ceiling_only_run_has_no_ratios_and_meets_none() -> None:
    results = {"a_ceiling": ceiling(90_000, "cpu"), "data": "ceiling only"}
    summary = summarise(results)
    assert summary["figures"]["c_over_b"] is None
    assert summary["figures"]["c_over_a"] is None
    assert not summary["met"]["c_over_b"] and not summary["met"]["c_over_a"]
    report = {
        "results": results,
        "summary": summary,
        "machine": {"cores": 2, "cpu_capability": "AVX512", "load_average_at_start": [0.1]},
    }
    table = render_table(report)
    assert "(a) model ceiling, windows/s" in table and "90,000" in table
    assert "(c)/(b)" not in table
    assert "GFLOP/s" not in table  # no sgemm peak measured (a GPU run)
    a_ceiling: dict[str, Any] = results["a_ceiling"]  # type: ignore[assignment]
    a_ceiling["sgemm_peak_flops_2t"] = 280.4e9  # a CPU run: the VM's speed
    assert "measured sgemm peak, 2 threads, GFLOP/s" in render_table(report)
    assert render_table(report).split("GFLOP/s")[1].split()[0] == "280"


def test_c_over_a_uses_the_re_measured_ceiling_and_reports_the_sweep_max_beside() -> None:
    results = {
        "a_ceiling": ceiling(80_000, "cpu"),
        "c_tickcast": {"predictions_per_s": 50_000},
        "b_naive": {"predictions_per_s": 300},
    }
    figures = summarise(results)["figures"]
    assert figures["c_over_a"] == 0.625
    assert figures["c_over_a_sweep_max"] == round(50_000 / 88_000, 3)
    assert summarise(results)["met"]["c_over_a"]


def test_half_load_p99_is_judged_only_when_every_tick_was_predicted() -> None:
    def at_half(p99_ms: float, complete: bool) -> bool:
        load = {"load_fraction": 0.5, "p99_ms": p99_ms, "complete": complete}
        results = {"a_ceiling": ceiling(80_000, "cpu"), "latency": [load]}
        return bool(summarise(results)["met"]["p99_ms_at_half_load"])

    assert at_half(30.0, complete=True)
    assert not at_half(80.0, complete=True)
    # A low p99 over only the predictions that arrived before the wait ran out.
    assert not at_half(30.0, complete=False)


class _FakeProbe(CeilingProbe):
    """Returns the next of a fixed list of rates instead of running a forward pass."""

    def __init__(self, rates: list[float]) -> None:
        super().__init__("p/1tx2w", 1024, lambda w: w, 1, 2, np.zeros((1, 60)))
        self.rates = rates

    def measure(self, seconds: float) -> float:
        return self.rates.pop(0)


def test_the_ceiling_is_the_median_of_its_re_measurements(tmp_path: Path) -> None:
    plan = mock.Mock(spec=Plan, confirm_seconds=0.01)
    ctx = Context("unused", tmp_path, tmp_path, "cpu", plan)
    ctx.ceiling_probe = _FakeProbe([70_000, 90_000, 80_000, 100_000])
    ctx.results["a_ceiling"] = {
        "best": {"windows_per_s": None, "sweep_max_windows_per_s": 99_000, "confirmations": []},
        "flops_per_window": 1_000_000,
        "sgemm_peak_flops_2t": 200e9,
        "flop_fraction_of_sgemm_peak": None,
    }
    a = ctx.results["a_ceiling"]
    confirm_ceiling(ctx)
    assert a["best"]["windows_per_s"] == 70_000
    assert a["flop_fraction_of_sgemm_peak"] == 0.35
    confirm_ceiling(ctx)
    confirm_ceiling(ctx)
    assert a["best"]["confirmations"] == [70_000, 90_000, 80_000]
    assert a["best"]["windows_per_s"] == 80_000
    confirm_ceiling(ctx)  # an even count: the mean of the middle two
    assert a["best"]["windows_per_s"] == 85_000
    assert a["best"]["sweep_max_windows_per_s"] == 99_000  # kept as measured


def test_the_half_load_is_offered_several_times_between_the_other_loads() -> None:
    assert latency_schedule((0.25, 0.5, 0.75, 1.0), 3) == [0.5, 0.25, 0.5, 0.75, 0.5, 1.0]
    assert latency_schedule((0.25, 0.5, 0.75, 1.0), 1) == [0.5, 0.25, 0.75, 1.0]
    assert latency_schedule((0.5,), 2) == [0.5, 0.5]
    assert latency_schedule((0.25, 0.5), 4) == [0.5, 0.25, 0.5, 0.5, 0.5]
    # Without a half load in the plan there is nothing to repeat.
    assert latency_schedule((0.25, 1.0), 3) == [0.25, 1.0]


def _window(fraction: float, latency_s: np.ndarray, complete: bool = True) -> dict[str, Any]:
    return {
        "load_fraction": fraction,
        "achieved_ticks_per_s": 1000,
        "ticks": len(latency_s),
        "predicted": len(latency_s) if complete else len(latency_s) - 1,
        "complete": complete,
        **latency_summary(latency_s),
    }


def test_half_load_windows_are_pooled_over_all_their_ticks() -> None:
    calm = np.full(1000, 0.020)  # 20 ms each
    spiky = np.r_[np.full(950, 0.030), np.full(50, 0.400)]  # 5 % at 400 ms
    windows = [_window(0.5, calm), _window(0.25, calm), _window(0.5, spiky)]
    pooled = pool_windows(windows, [calm, spiky], 0.5)
    assert pooled is not None
    assert pooled["windows"] == 2 and pooled["ticks"] == pooled["predicted"] == 2000
    assert pooled["complete"]
    # The spiky window's 50 slow ticks are 2.5 % of all 2,000: the pooled p99 is theirs,
    # although the median window's p99 would be 20 ms.
    assert pooled["p99_ms"] == 400.0
    assert pooled["p50_ms"] == 25.0
    assert pooled["p99_ms_per_window"] == [20.0, 400.0]
    assert "appended_p99_ms" not in pooled  # no stage given, none pooled
    # With the time until the daemon appended each prediction, that stage is pooled too.
    staged = pool_windows(windows, [calm, spiky], 0.5, [calm / 2, spiky / 2])
    assert staged is not None
    assert (staged["appended_p50_ms"], staged["appended_p99_ms"]) == (12.5, 200.0)
    results: dict[str, Any] = {
        "a_ceiling": ceiling(80_000, "cpu"),
        "latency": windows,
        "half_load": staged,
        "data": "test",
    }
    machine = {"cores": 2, "cpu_capability": "AVX512", "load_average_at_start": [0.1]}
    table = render_table({"results": results, "summary": summarise(results), "machine": machine})
    assert "of it until the daemon appended the prediction, p50/p99 ms" in table
    assert "12.5/200.0" in table
    incomplete = [_window(0.5, calm), _window(0.5, calm, complete=False)]
    assert not pool_windows(incomplete, [calm, calm], 0.5)["complete"]  # type: ignore[index]
    assert pool_windows(windows, [], 0.75) is None


def test_the_pooled_half_load_is_what_is_judged_and_shown() -> None:
    calm = np.full(1000, 0.020)
    spiky = np.r_[np.full(950, 0.030), np.full(50, 0.400)]
    windows = [_window(0.5, calm), _window(0.25, calm), _window(0.5, calm), _window(0.5, spiky)]
    pooled = pool_windows(windows, [calm, calm, spiky], 0.5)
    assert pooled is not None
    results: dict[str, Any] = {
        "a_ceiling": ceiling(80_000, "cpu"),
        "latency": windows,
        "half_load": pooled,
        "data": "test",
    }
    summary = summarise(results)
    # Two of the three windows alone would meet the target; all their ticks together do not.
    assert summary["figures"]["p99_ms_at_half_load"] == pooled["p99_ms"] > 50
    assert not summary["met"]["p99_ms_at_half_load"]
    report = {
        "results": results,
        "summary": summary,
        "machine": {"cores": 2, "cpu_capability": "AVX512", "load_average_at_start": [0.1]},
    }
    table = render_table(report)
    assert "0.50 x (c), 3 windows" in table
    assert "20/20/400" in table  # each window's p99, in the order offered
    assert table.count("0.25 x (c)") == 1
    # An earlier report (one half-load window, no pooled figure) is judged by that window.
    del results["half_load"]
    results["latency"] = windows[:2]
    assert summarise(results)["figures"]["p99_ms_at_half_load"] == 20.0
    assert summarise(results)["met"]["p99_ms_at_half_load"]
