"""Finding the processes a command under test started, through a marker in the environment.

Every process a child starts inherits its environment, so scanning ``/proc`` for a marker
variable finds the whole tree while it runs and proves nothing is left once it exited.
"""

from __future__ import annotations

from pathlib import Path

MARKER_VAR = "TICKCAST_TEST_MARKER"


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
