"""The bench's verdicts are computed from the measured numbers, per device."""

from __future__ import annotations

from typing import Any

from daemon.bench import render_table, summarise


def ceiling(windows_per_s: float, device: str) -> dict[str, Any]:
    return {
        "device": device,
        "best": {"path": "p", "batch": 256, "windows_per_s": windows_per_s},
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
