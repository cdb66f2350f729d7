"""The suite kills child processes a failed test left running (tests/support/processes)."""

from __future__ import annotations

import subprocess
import sys

from tests.support.processes import kill_leftovers, track


def test_children_left_running_are_killed_and_finished_ones_left_alone() -> None:
    running = track(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
    finished = track(subprocess.Popen([sys.executable, "-c", "pass"]))
    finished.wait(30)
    assert kill_leftovers() == 1
    assert running.poll() is not None  # killed and reaped
    assert kill_leftovers() == 0  # forgotten once handled
