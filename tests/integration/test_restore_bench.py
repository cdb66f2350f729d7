"""The restore benchmark's machinery, at a small size: windows come back exact."""

from __future__ import annotations

import pytest

from daemon.bench.restore import measure_restore
from tests.support.daemon import make_checkpoint

pytestmark = pytest.mark.kafka


async def test_restore_from_snapshots_is_exact_and_replays_only_the_tail(kafka_bootstrap, tmp_path):
    make_checkpoint(tmp_path / "ck")
    figures = await measure_restore(
        kafka_bootstrap, tmp_path / "ck", symbols=300, ticks_per_symbol=80, partitions=3, tail=5
    )
    assert figures["records_behind_committed_offset"] == 300 * 80
    assert figures["snapshots_loaded"] == 300
    assert figures["records_replayed"] == 300 * 5
    assert figures["restored_windows_exact"] is True
    assert 0 < figures["restore_seconds"] <= figures["subscribe_to_ready_seconds"]
