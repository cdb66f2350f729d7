"""Finding the processes a command under test started, through a marker in the environment.

Every process a child starts inherits its environment, so scanning ``/proc`` for a marker
variable finds the whole tree while it runs and proves nothing is left once it exited.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

MARKER_VAR = "TICKCAST_TEST_MARKER"

# Child processes started by test helpers; whatever a test leaves running (it failed
# before stopping them) is killed after it, so that it cannot take CPU from the next.
_children: list[subprocess.Popen[bytes]] = []


def track(process: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    """Remember ``process`` for :func:`kill_leftovers`; returns it."""
    _children.append(process)
    return process


def kill_leftovers() -> int:
    """Kill every tracked child still running; forget them all. Returns how many it killed."""
    killed = 0
    for process in _children:
        if process.poll() is None:
            process.kill()
            process.wait(10)
            killed += 1
    _children.clear()
    return killed


def marked_processes(marker: str) -> dict[int, str]:
    """pid -> command name of every process whose environment holds ``marker``."""
    needle = f"{MARKER_VAR}={marker}".encode()
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "comm").read_text().strip()
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found
