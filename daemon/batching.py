"""The windows waiting to be scored, and how a batch is cut from them.

The score task (``TickcastService._score_loop``) decides *when* a batch goes and how many
rows it may take; :class:`PendingWindows` holds the fetched chunks in arrival order and
cuts batches from the oldest, splitting a chunk across batches where allowed. A chunk is
*completed* by the batch that takes its last row: its offsets can be committed once that
batch is acknowledged.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from daemon.pipeline import Chunk, ScoringRows


@dataclass
class _Waiting:
    chunk: Chunk
    arrived_at: float  # time.monotonic() when it joined
    next_row: int = 0  # rows before it went out in earlier batches


class PendingWindows:
    """Chunks waiting to be scored, oldest first, and the windows they still hold."""

    def __init__(self) -> None:
        self._waiting: deque[_Waiting] = deque()
        self.rows = 0  # windows not yet in a batch

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def add(self, chunk: Chunk, now: float) -> None:
        self._waiting.append(_Waiting(chunk, now))
        self.rows += len(chunk.rows)

    @property
    def oldest_arrival(self) -> float:
        """When the oldest waiting window arrived (a split chunk's rest has waited since)."""
        return self._waiting[0].arrived_at

    def take(
        self, max_rows: int, *, whole_chunks: bool = False
    ) -> tuple[list[ScoringRows], list[Chunk]]:
        """Up to ``max_rows`` windows from the oldest chunks, and the chunks this completes.

        With ``whole_chunks`` (exactly-once) a chunk is never split across two batches, so
        each transaction commits exactly the offsets whose predictions it carries; the
        first chunk goes whole even when larger than ``max_rows``. Chunks without windows
        (only bad ticks, or windows not yet full) ride along with the batch before them
        (with ``whole_chunks``, unless its first chunk took it past ``max_rows``: then they
        go with the next).
        """
        parts: list[ScoringRows] = []
        completed: list[Chunk] = []
        waiting = self._waiting
        room = max_rows
        if whole_chunks:
            while waiting and (not completed or len(waiting[0].chunk.rows) <= room):
                chunk = waiting.popleft().chunk
                if len(chunk.rows):
                    parts.append(chunk.rows)
                room -= len(chunk.rows)
                completed.append(chunk)
        else:
            while waiting and room > 0:
                head = waiting[0]
                start = head.next_row
                stop = min(len(head.chunk.rows), start + room)
                if stop > start:
                    parts.append(head.chunk.rows.take(start, stop))
                    room -= stop - start
                if stop == len(head.chunk.rows):
                    completed.append(head.chunk)
                    waiting.popleft()
                else:
                    head.next_row = stop
            while waiting and len(waiting[0].chunk.rows) == 0:
                completed.append(waiting.popleft().chunk)
        self.rows -= sum(len(p) for p in parts)
        return parts, completed
