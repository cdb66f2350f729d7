"""CPU and RSS of the daemon under test, and of the whole machine (busy and stolen cores),
sampled in a thread through a phase."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from daemon.bench.child import ChildDaemon


def parse_proc_stat(first_line: str, ticks_per_s: float) -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine from /proc/stat's ``cpu`` line.
    Busy is user, nice, system, irq and softirq; stolen is time the hypervisor gave this
    VM's CPUs to someone else, which no process here sees in its own CPU time."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, first_line.split()[1:9])
    return (user + nice + system + irq + softirq) / ticks_per_s, steal / ticks_per_s


def machine_cpu_seconds() -> tuple[float, float]:
    """:func:`parse_proc_stat` now; (nan, nan) where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            return parse_proc_stat(f.readline(), os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError):
        return float("nan"), float("nan")


class Sampler:
    """Samples a child's CPU seconds and RSS, and the machine's busy and stolen CPU
    seconds, every ``period`` seconds in a thread."""

    def __init__(self, child: ChildDaemon, period: float = 0.1) -> None:
        self.child = child
        self.period = period
        # (time.time(), child cpu s, child rss, machine busy s, machine stolen s)
        self.samples: list[tuple[float, float, int, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                cpu, rss = self.child.cpu_seconds(), self.child.rss()
                self.samples.append((time.time(), cpu, rss, *machine_cpu_seconds()))
            self._stop.wait(self.period)

    def window(self, start: float, stop: float) -> dict[str, float]:
        """The child's CPU use (cores) and RSS, and the machine's busy and stolen cores,
        over [start, stop] of wall time."""
        inside = [s for s in self.samples if start <= s[0] <= stop]
        if len(inside) < 2:
            # A window shorter than the sampling period: the samples just around it.
            before = [s for s in self.samples if s[0] < start][-1:]
            after = [s for s in self.samples if s[0] > stop][:1]
            inside = before + inside + after
        if len(inside) < 2:
            nan = float("nan")
            rss = max((s[2] for s in inside), default=0)
            keys = ("cpu_cores", "machine_busy_cores", "machine_stolen_cores")
            return {**dict.fromkeys(keys, nan), "rss_max_bytes": rss}
        first, last = inside[0], inside[-1]
        wall = max(last[0] - first[0], 1e-9)
        return {
            "cpu_cores": round((last[1] - first[1]) / wall, 2),
            "rss_max_bytes": max(s[2] for s in inside),
            "machine_busy_cores": round((last[3] - first[3]) / wall, 2),
            "machine_stolen_cores": round((last[4] - first[4]) / wall, 2),
        }

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
