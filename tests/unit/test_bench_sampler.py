"""The bench's CPU figures: the child's, the machine's, and what the hypervisor took."""

from __future__ import annotations

import math
import os

import pytest

from daemon.bench.sampling import Sampler, machine_cpu_seconds, parse_proc_stat


def test_proc_stat_busy_and_stolen_seconds() -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice (in clock ticks)
    line = "cpu  1000 20 300 9000 50 4 6 250 0 0"
    busy, stolen = parse_proc_stat(line, ticks_per_s=100)
    assert busy == pytest.approx((1000 + 20 + 300 + 4 + 6) / 100)  # idle, iowait, steal out
    assert stolen == pytest.approx(2.5)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="no /proc/stat")
def test_machine_cpu_seconds_grow_while_this_process_computes() -> None:
    busy0, stolen0 = machine_cpu_seconds()
    deadline = os.times().elapsed + 0.3
    while os.times().elapsed < deadline:
        sum(range(10_000))
    busy1, stolen1 = machine_cpu_seconds()
    assert busy1 - busy0 > 0.1 and stolen1 >= stolen0


def test_window_turns_counters_into_cores() -> None:
    sampler = Sampler.__new__(Sampler)  # no child, no thread: just the arithmetic
    sampler.samples = [
        (100.0, 10.0, 700, 50.0, 5.0),
        (101.0, 11.5, 900, 51.8, 5.1),
        (102.0, 13.0, 800, 53.6, 5.2),
    ]
    assert sampler.window(100.0, 102.0) == {
        "cpu_cores": 1.5,
        "rss_max_bytes": 900,
        "machine_busy_cores": 1.8,
        "machine_stolen_cores": 0.1,
    }


def test_a_window_shorter_than_the_period_reads_the_samples_around_it() -> None:
    # Not the newest two samples, taken after the phase ended (as before).
    sampler = Sampler.__new__(Sampler)
    sampler.samples = [
        (100.0, 10.0, 700, 50.0, 5.0),
        (101.0, 12.0, 900, 52.0, 5.0),  # the 0.2 s phase lies between these two
        (102.0, 12.1, 800, 52.1, 5.0),
        (103.0, 12.2, 800, 52.2, 5.0),
    ]
    window = sampler.window(100.4, 100.6)
    assert window["cpu_cores"] == 2.0 and window["machine_busy_cores"] == 2.0
    assert window["rss_max_bytes"] == 900
    empty = Sampler.__new__(Sampler)
    empty.samples = [(100.0, 10.0, 700, 50.0, 5.0)]
    assert math.isnan(empty.window(101.0, 102.0)["cpu_cores"])


def test_without_proc_stat_the_machine_figures_are_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_file(*_: object, **__: object) -> None:
        raise FileNotFoundError("/proc/stat")

    monkeypatch.setattr("builtins.open", no_file)
    assert all(math.isnan(x) for x in machine_cpu_seconds())
