"""Conflation (TICKCAST_CONFLATE): only each symbol's newest queued window is scored.

``TickcastService._conflate`` on hand-built ScoringRows of real GOOG windows: it keeps the
last row of each symbol, in arrival order, with every field taken from the same row, and
counts the others in ``tickcast_ticks_conflated_total``. Through ``_submit``: the setting
(from the environment too) decides whether anything is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from daemon.metrics import DaemonMetrics
from daemon.pipeline import ScoringRows
from daemon.service import TickcastService
from daemon.settings import Settings
from model.data import load_series, make_windows
from tests.support.daemon import make_checkpoint

WINDOW = 60
CONFLATED = "tickcast_ticks_conflated_total"
GOOG = load_series("dataset:goog")[0]
GOOG_WINDOWS, _ = make_windows(GOOG.prices, WINDOW)


def rows_for(symbols: list[str]) -> ScoringRows:
    """Row i: GOOG's window i under ``symbols[i]``, in time order; a slot per symbol."""
    n = len(symbols)
    slot_of = {s: k for k, s in enumerate(dict.fromkeys(symbols))}
    ts = GOOG.ts[WINDOW - 1 : WINDOW - 1 + n]
    last: dict[str, int] = {}
    prev_ts = []
    for symbol, t in zip(symbols, ts.tolist(), strict=True):
        prev_ts.append(last.get(symbol, 0))
        last[symbol] = t
    windows = np.array(GOOG_WINDOWS[:n])
    return ScoringRows(
        windows=windows,
        symbols=np.array(symbols, dtype=object),
        prices=windows[:, -1].copy(),
        ts=ts.copy(),
        prev_ts=np.array(prev_ts, np.int64),
        slots=np.array([slot_of[s] for s in symbols], np.int64),
        partitions=np.array([slot_of[s] % 3 for s in symbols], np.int32),
        offsets=np.arange(n, dtype=np.int64) + 1000,
        consumed_at=np.arange(n, dtype=np.float64) + 0.5,
    )


def build(root: Path, **overrides: object) -> TickcastService:
    s = Settings(checkpoint_dir=root, device="cpu", metrics_port=0, **overrides)  # type: ignore[arg-type]
    return TickcastService(s, DaemonMetrics(CollectorRegistry(), process=False))


def conflated(service: TickcastService) -> float:
    value = service.metrics.registry.get_sample_value(CONFLATED)
    assert value is not None, f"{CONFLATED} is not registered"
    return value


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("checkpoints")
    make_checkpoint(directory, window_length=WINDOW)
    return directory


@pytest.fixture(scope="module")
def service(root: Path) -> Iterator[TickcastService]:
    built = build(root, conflate=True)
    yield built
    built._inference.shutdown()


def assert_rows_equal(got: ScoringRows, want: ScoringRows) -> None:
    for name in ScoringRows.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


# --------------------------------------------------------------------------- _conflate


def test_keeps_the_newest_row_of_each_symbol_in_arrival_order(service: TickcastService) -> None:
    rows = rows_for(["A", "B", "A", "C", "B", "A"])
    before = conflated(service)
    kept = service._conflate(rows)
    assert_rows_equal(kept, rows.take(3, 6))  # C (3), then B's last (4), then A's last (5)
    assert kept.symbols.tolist() == ["C", "B", "A"]
    assert conflated(service) - before == 3


def test_every_field_comes_from_the_kept_row(service: TickcastService) -> None:
    rows = rows_for(["A", "A", "B", "B", "A", "C", "C"])
    kept = service._conflate(rows)
    want = [3, 4, 6]  # B's last, A's last, C's last
    for name in ScoringRows.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(kept, name), getattr(rows, name)[want], err_msg=name)
    np.testing.assert_array_equal(kept.prices, kept.windows[:, -1])


def test_nothing_repeated_nothing_dropped(service: TickcastService) -> None:
    rows = rows_for(["A", "B", "C", "D"])
    before = conflated(service)
    assert service._conflate(rows) is rows
    assert conflated(service) == before


def test_one_symbol_keeps_one_row(service: TickcastService) -> None:
    rows = rows_for(["A"] * 50)
    before = conflated(service)
    kept = service._conflate(rows)
    assert_rows_equal(kept, rows.take(49, 50))
    assert conflated(service) - before == 49


def test_dropped_windows_leave_the_inflight_count(root: Path) -> None:
    fresh = build(root, conflate=True)
    fresh._inflight_windows = 10
    fresh._conflate(rows_for(["A", "B", "A", "A", "C", "B", "D", "E", "F", "G"]))
    assert fresh._inflight_windows == 7
    assert conflated(fresh) == 3
    fresh._inference.shutdown()


symbol_lists = st.lists(st.sampled_from("ABCDEFG"), min_size=1, max_size=80)


@settings(max_examples=100, deadline=None)
@given(symbols=symbol_lists)
def test_matches_a_last_per_symbol_reference(service: TickcastService, symbols: list[str]) -> None:
    rows = rows_for(symbols)
    newest = {s: i for i, s in enumerate(symbols)}
    want = sorted(newest.values())
    before = conflated(service)
    kept = service._conflate(rows)
    assert kept.offsets.tolist() == [1000 + i for i in want]
    assert sorted(kept.symbols.tolist()) == sorted(newest)  # each symbol exactly once
    assert (np.diff(kept.ts) > 0).all()  # arrival (and time) order kept
    assert conflated(service) - before == len(symbols) - len(newest)


# --------------------------------------------------------------------------- _submit


async def test_conflate_from_the_environment_scores_only_the_newest(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TICKCAST_CONFLATE", "true")
    on = build(root)
    assert on.settings.conflate is True
    rows = rows_for(["A", "B", "A", "B", "A"])
    batch = on._submit([rows], [])
    assert batch.inference is not None
    predictions, _ = await batch.inference
    assert batch.rows.symbols.tolist() == ["B", "A"]
    np.testing.assert_array_equal(batch.rows.windows, rows.windows[[3, 4]])
    assert len(predictions) == 2
    assert conflated(on) == 3
    on._inference.shutdown()


async def test_conflate_off_drops_nothing(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TICKCAST_CONFLATE", raising=False)
    off = build(root)
    assert off.settings.conflate is False
    rows = rows_for(["A", "B", "A", "B", "A"])
    batch = off._submit([rows], [])
    assert batch.inference is not None
    predictions, _ = await batch.inference
    assert_rows_equal(batch.rows, rows)
    assert len(predictions) == 5
    assert conflated(off) == 0
    off._inference.shutdown()


async def test_flag_off_overrides_the_environment(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TICKCAST_CONFLATE", "true")
    off = build(root, conflate=False)
    batch = off._submit([rows_for(["A", "A", "A"])], [])
    assert batch.inference is not None
    await batch.inference
    assert len(batch.rows) == 3
    assert conflated(off) == 0
    off._inference.shutdown()
