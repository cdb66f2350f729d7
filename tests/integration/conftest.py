"""Fixtures for daemon tests on the real broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.daemon import make_checkpoint


@pytest.fixture
def checkpoint_dir(tmp_path: Path) -> Path:
    root = tmp_path / "checkpoints"
    make_checkpoint(root)
    return root


@pytest.fixture
async def daemon_topics(topic_factory) -> dict[str, str]:
    return {
        "input": await topic_factory(partitions=3, prefix="ticks"),
        "output": await topic_factory(partitions=3, prefix="predictions"),
        "dlq": await topic_factory(partitions=1, prefix="dlq"),
    }
