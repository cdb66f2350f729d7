"""The promotion gate of the retrain job, on real bundled series.

- scale-free with several series: each series' errors divided by its naive RMSE (F1);
- never decided on the incumbent's own training data (its ``meta.training_data``) (F2);
- an incumbent with another window length is scored on the same targets, from its own
  windows (F3);
- (read LATEST, decide, promote) under an exclusive lock, so two runs cannot both promote
  against a stale LATEST (F7); an unreadable LATEST or a failed promotion exits 2.

The incumbent is usually an untrained model, which *is* the naive forecast (zero residual
head), and the candidate's predictions are the naive forecast with every error multiplied
by a chosen factor, so each expected figure can be written down.
"""

from __future__ import annotations

import fcntl
import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import model.retrain as retrain_module
from model.checkpoint import (
    LATEST_FILE,
    CheckpointError,
    CheckpointMeta,
    DataRange,
    load_checkpoint,
    new_version,
    promote,
    read_latest,
    read_meta,
    save_checkpoint,
)
from model.data import (
    ChronologicalSplit,
    PriceSeries,
    chronological_split,
    load_series,
    make_windows,
)
from model.evaluate import evaluate_forecasts, predict_windows
from model.gru import ModelConfig, PriceGRU
from model.retrain import (
    PROMOTE_LOCK_FILE,
    decide_promotion,
    held_out_rmse_ratio,
    held_out_windows,
    promotion_lock,
    run_retrain,
    training_ranges,
)
from model.walk_forward import walk_forward_splits
from tests.support.retrain import FAST, WINDOW, parse


@pytest.fixture(scope="module")
def btc_eur() -> ChronologicalSplit:
    """BTCUSD (monthly, prices up to ~1e5: 20 test windows) and EURUSD (hourly, ~1.1: 747)."""
    series = [load_series("dataset:btcusd")[0], load_series("dataset:eurusd")[0]]
    return chronological_split(series, window_length=WINDOW)


def install(
    root: Path, window_length: int = WINDOW, training_data: Sequence[DataRange] = ()
) -> str:
    """Put an untrained (= naive forecast) model in service, with this training record."""
    model = PriceGRU(ModelConfig(hidden_size=8, window_length=window_length))
    version = new_version()
    meta = CheckpointMeta(
        version=version, architecture=model.config, training_data=list(training_data)
    )
    save_checkpoint(root, model, meta)
    promote(root, version)
    return version


def naive_times(split: ChronologicalSplit, factors: Sequence[float]) -> np.ndarray:
    """Predictions whose errors are ``factors[i]`` times the naive forecast's on series i."""
    test = split.test
    factor = np.asarray(factors)[test.series_index]
    return test.targets + factor * (test.last - test.targets)


def pooled_rmse(predicted: np.ndarray, targets: np.ndarray) -> float:
    return float(np.sqrt(np.mean((predicted - targets) ** 2)))


def trained_through(series: PriceSeries, ts: int) -> DataRange:
    """A training record of ``series`` from its first row through time ``ts``."""
    (row,) = np.flatnonzero(series.ts == ts)
    first, last = series.iso_range(0, int(row) + 1)
    return DataRange(
        source=series.source, symbol=series.symbol, start=first, end=last, rows=int(row) + 1
    )


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert run_retrain(parse(*argv, "--json")) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return report


# --------------------------------------------------------------------------- F1: scale-free


@pytest.mark.parametrize(
    ("factors", "promoted"),
    [
        # Better on BTCUSD, much worse on EURUSD: better in pooled price units (BTCUSD's
        # errors are ~7,000,000 times larger), worse once each series is scaled.
        ((0.9, 3.0), False),
        # The other way round.
        ((1.1, 0.5), True),
    ],
)
def test_the_gate_follows_per_series_scaled_rmse_not_pooled_price_units(
    tmp_path: Path,
    btc_eur: ChronologicalSplit,
    factors: tuple[float, float],
    promoted: bool,
) -> None:
    test = btc_eur.test
    install(tmp_path, training_data=training_ranges(btc_eur))
    candidate = naive_times(btc_eur, factors)
    # The case is discriminating: pooled in price units the verdict would be the opposite.
    assert (pooled_rmse(candidate, test.targets) <= pooled_rmse(test.last, test.targets)) is (
        not promoted
    )

    decision = decide_promotion(tmp_path, btc_eur, candidate)

    assert decision.promote is promoted
    assert decision.reason.startswith("not worse:" if promoted else "worse:")
    assert "errors scaled by each series' naive RMSE" in decision.reason
    counts = np.bincount(test.series_index)
    expected = np.sqrt((counts * np.square(factors)).sum() / counts.sum())
    assert decision.candidate_rmse == pytest.approx(expected)
    assert decision.incumbent_rmse == pytest.approx(1.0, rel=1e-3)  # naive, scaled: 1
    assert decision.compared_windows == len(test)


def test_recorded_ratio_is_scaled_per_series(btc_eur: ChronologicalSplit) -> None:
    test = btc_eur.test
    predicted = naive_times(btc_eur, (0.9, 3.0))
    counts = np.bincount(test.series_index)
    scaled = np.sqrt((counts * np.square([0.9, 3.0])).sum() / counts.sum())
    assert held_out_rmse_ratio(btc_eur, predicted) == pytest.approx(scaled)
    pooled = evaluate_forecasts(test.targets, predicted, test.last)["rmse_ratio"]
    assert pooled == pytest.approx(0.9, rel=1e-3)  # what BTCUSD alone says


def test_one_series_ratio_is_unchanged(goog: PriceSeries) -> None:
    split = chronological_split(goog, window_length=WINDOW)
    rng = np.random.default_rng(0)
    predicted = split.test.targets + rng.normal(0, 5, len(split.test))
    plain = evaluate_forecasts(split.test.targets, predicted, split.test.last)["rmse_ratio"]
    assert held_out_rmse_ratio(split, predicted) == plain


def test_retrain_records_the_scaled_ratio(
    goog_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--data", str(goog_csv), "--data", "dataset:btcusd", *FAST]
    report = run_json(capsys, *argv, "--checkpoint-dir", str(tmp_path))
    checkpoint = load_checkpoint(report["checkpoint"])
    series = [load_series(str(goog_csv))[0], load_series("dataset:btcusd")[0]]
    split = chronological_split(series, window_length=WINDOW)
    predicted = predict_windows(checkpoint.model, split.test.windows)

    ratio = held_out_rmse_ratio(split, predicted)
    assert checkpoint.meta.evaluation["rmse_ratio"] == pytest.approx(ratio)
    assert report["evaluation"]["rmse_ratio"] == checkpoint.meta.evaluation["rmse_ratio"]
    pooled = evaluate_forecasts(split.test.targets, predicted, split.test.last)["rmse_ratio"]
    assert ratio != pytest.approx(pooled, rel=1e-6)  # trained: the two differ
    assert report["series"] == ["GOOG", "BTCUSD"]

    run_retrain(parse(*argv, "--checkpoint-dir", str(tmp_path / "text")))
    assert "RMSE ratio GRU / naive (errors scaled by each series' naive RMSE)" in (
        capsys.readouterr().out
    )


# --------------------------------------------------------------------------- F2: in-sample


def test_windows_inside_the_incumbents_training_data_are_not_compared(
    tmp_path: Path, goog: PriceSeries
) -> None:
    split = chronological_split(goog, window_length=WINDOW)
    test = split.test
    seen = len(test) // 2  # the incumbent was fitted through the target of test window seen-1
    install(tmp_path, training_data=[trained_through(goog, int(test.target_ts[seen - 1]))])
    # Very bad where the incumbent has seen the answers, better than it afterwards.
    candidate = test.targets + np.where(np.arange(len(test)) < seen, 5.0, 0.8) * (
        test.last - test.targets
    )
    assert pooled_rmse(candidate, test.targets) > pooled_rmse(test.last, test.targets)

    decision = decide_promotion(tmp_path, split, candidate)

    assert decision.promote
    assert decision.compared_windows == len(test) - seen
    assert f"of {len(test)} ({seen} with targets inside" in decision.reason
    unseen = slice(seen, None)
    assert decision.candidate_rmse == pytest.approx(
        0.8 * pooled_rmse(test.last[unseen], test.targets[unseen])
    )


def test_nothing_out_of_sample_keeps_the_incumbent_unless_forced(
    tmp_path: Path, goog: PriceSeries, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="model.retrain")
    split = chronological_split(goog, window_length=WINDOW)
    version = install(tmp_path, training_data=[trained_through(goog, int(goog.ts[-1]))])
    better = naive_times(split, [0.5])

    decision = decide_promotion(tmp_path, split, better)

    assert not decision.promote
    assert decision.incumbent_version == version
    assert decision.compared_windows == 0
    assert decision.incumbent_rmse is None
    assert decision.reason.startswith("no out-of-sample comparison possible")
    assert "no out-of-sample comparison possible" in caplog.text
    assert decide_promotion(tmp_path, split, better, force=True).promote


def test_symbols_the_incumbent_never_saw_are_out_of_sample(
    tmp_path: Path, btc_eur: ChronologicalSplit
) -> None:
    btc = btc_eur.cuts[0].series
    # Trained on all of BTCUSD, never on EURUSD: only EURUSD's windows are compared.
    install(tmp_path, training_data=[trained_through(btc, int(btc.ts[-1]))])
    decision = decide_promotion(tmp_path, btc_eur, naive_times(btc_eur, (5.0, 0.9)))
    assert decision.compared_windows == int((btc_eur.test.series_index == 1).sum())
    assert decision.promote  # decided by EURUSD alone, where the candidate is better
    assert decision.candidate_rmse == pytest.approx(0.9)


def test_retrain_after_one_that_trained_on_later_rows(
    goog_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = ["--checkpoint-dir", str(tmp_path)]
    # Fitted through 90 % of the rows; the next run tests the last 15 %.
    first = run_json(capsys, "--data", str(goog_csv), *FAST, *ck, "--test-fraction", "0.1")
    second = run_json(capsys, "--data", str(goog_csv), *FAST, *ck)

    assert second["windows"]["test"] > first["windows"]["test"]
    # Compared on exactly the windows after the incumbent's training end: its own test set.
    assert second["compared_windows"] == first["windows"]["test"]
    promotion = read_meta(Path(second["checkpoint"])).evaluation["promotion"]
    assert promotion["compared_windows"] == first["windows"]["test"]
    assert promotion["incumbent_version"] == first["version"]
    assert f"of {second['windows']['test']}" in second["reason"]


# --------------------------------------------------------------------------- F3: window length


def test_another_window_length_is_scored_from_its_own_windows(
    tmp_path: Path, goog: PriceSeries
) -> None:
    split = chronological_split(goog, window_length=WINDOW)
    install(tmp_path, window_length=WINDOW + 5, training_data=training_ranges(split))
    naive_rmse = pooled_rmse(split.test.last, split.test.targets)

    worse = decide_promotion(tmp_path, split, naive_times(split, [1.01]))
    assert not worse.promote
    assert worse.compared_windows == len(split.test)
    assert worse.incumbent_rmse == pytest.approx(naive_rmse, rel=1e-6)
    assert f"each model on its own window length ({WINDOW} vs {WINDOW + 5})" in worse.reason
    assert decide_promotion(tmp_path, split, naive_times(split, [0.99])).promote
    assert decide_promotion(tmp_path, split, naive_times(split, [1.01]), force=True).promote


def test_held_out_windows_cut_the_same_targets(goog: PriceSeries) -> None:
    split = chronological_split(goog, window_length=WINDOW)
    same, all_there = held_out_windows(split, WINDOW)
    assert same is split.test.windows
    assert all_there.all()
    longer, has_history = held_out_windows(split, 45)
    assert has_history.all()
    np.testing.assert_array_equal(longer[:, -1], split.test.last)
    rows = np.searchsorted(goog.ts, split.test.target_ts)
    np.testing.assert_array_equal(longer, np.stack([goog.prices[r - 45 : r] for r in rows]))


def test_held_out_windows_of_walk_forward_folds_and_short_history(goog: PriceSeries) -> None:
    final = walk_forward_splits([goog], 3, window_length=WINDOW, scheme="rolling")[-1]
    longer, has_history = held_out_windows(final, 33)
    assert has_history.all()
    windows, _ = make_windows(goog.prices, 33)
    rows = np.searchsorted(goog.ts, final.test.target_ts)
    np.testing.assert_array_equal(longer, windows[rows - 33])

    # 60 rows, window 20: test targets are rows 54..59; a 57-price window fits from row 57.
    short = PriceSeries(goog.symbol, goog.source, goog.ts[:60], goog.prices[:60])
    split = chronological_split(short, window_length=WINDOW)
    _, has_history = held_out_windows(split, 57)
    assert has_history.tolist() == [False] * 3 + [True] * 3


# --------------------------------------------------------------------------- F7: the lock


def test_promotion_lock_is_exclusive_and_not_a_version(tmp_path: Path) -> None:
    def try_lock() -> bool:
        with (tmp_path / PROMOTE_LOCK_FILE).open("a") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

    with promotion_lock(tmp_path):
        assert not try_lock()
        version = install(tmp_path)
    assert try_lock()
    assert (tmp_path / PROMOTE_LOCK_FILE).is_file()
    versions = [p.name for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert versions == [version]
    assert read_latest(tmp_path) == version


def test_a_run_waits_for_the_lock_and_decides_against_the_latest_then_in_place(
    goog_csv: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="model.retrain")
    first = install(tmp_path)
    codes: list[int] = []
    argv = ["--data", str(goog_csv), "--checkpoint-dir", str(tmp_path), *FAST, "--json"]
    with (tmp_path / PROMOTE_LOCK_FILE).open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another run is promoting
        worker = threading.Thread(target=lambda: codes.append(run_retrain(parse(*argv))))
        worker.start()
        deadline = time.monotonic() + 300
        while "waiting for another retrain to finish promoting" not in caplog.text:
            assert worker.is_alive(), "the run finished without waiting for the lock"
            assert time.monotonic() < deadline, caplog.text[-2000:]
            time.sleep(0.05)
        assert read_latest(tmp_path) == first  # nothing promoted while the lock is held
        second = install(tmp_path)  # ... which the other run now promotes
    worker.join()

    assert codes == [0]
    report = json.loads(capsys.readouterr().out)
    assert report["parent_version"] == second
    promotion = read_meta(Path(report["checkpoint"])).evaluation["promotion"]
    assert promotion["incumbent_version"] == second


# --------------------------------------------------------------------------- checkpoint errors


def test_unreadable_latest_exits_2_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / LATEST_FILE).mkdir()

    def no_training(*_: Any, **__: Any) -> Any:
        raise AssertionError("trained although LATEST cannot be read")

    monkeypatch.setattr(retrain_module, "fit_and_evaluate", no_training)
    code = run_retrain(parse("--data", "dataset:goog", "--checkpoint-dir", str(tmp_path), *FAST))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("tickcast retrain: error: checkpoint in service: ")
    assert str(tmp_path / LATEST_FILE) in err
    assert "Traceback" not in err


def test_failed_promotion_exits_2(
    goog_csv: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(_root: Any, version: str) -> None:
        raise CheckpointError(f"cannot promote {version!r}: refused")

    monkeypatch.setattr(retrain_module, "promote", refuse)
    code = run_retrain(parse("--data", str(goog_csv), "--checkpoint-dir", str(tmp_path), *FAST))
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot promote" in err
    assert "Traceback" not in err
    assert not (tmp_path / LATEST_FILE).exists()
