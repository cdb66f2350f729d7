"""Walk-forward evaluation: K successive train / validation / test folds in time order.

The last ``eval_fraction`` of each series' (window, next price) pairs is cut into K
consecutive test blocks. Fold k trains on the pairs before its test block (all of them:
*expanding*; or a fixed-length span just before it: *rolling*), early-stops on the last
``val_fraction`` of that span, and is scored on its block. So every test target comes after
every training and validation target of its fold, and the K test blocks together cover the
evaluated span exactly once: the overall figures, the Diebold-Mariano test against the
naive forecast and the block-bootstrap interval are computed on all of them together.

Indices here are *target* indices of :func:`model.data.make_windows`: target ``i`` is price
row ``i + window_length`` and its window is rows ``i .. i + window_length - 1``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from model.data import (
    ChronologicalSplit,
    DataError,
    PriceSeries,
    SeriesCut,
    SplitBy,
    WindowSet,
    covered_time,
    make_windows,
    uncovered_split,
)
from model.evaluate import (
    block_bootstrap_rmse_ratio,
    diebold_mariano,
    evaluate_forecasts,
    naive_scale,
    predict_windows,
)
from model.gru import ModelConfig
from model.train import TrainConfig, TrainResult, train_model

logger = logging.getLogger(__name__)

Scheme = Literal["expanding", "rolling"]
# Walk-forward folds common to several series are cut in this many equal slots of time.
TIME_SLOTS = 1_000_000
DEFAULT_EVAL_FRACTION = 0.3
DEFAULT_VAL_FRACTION = 0.15


@dataclass(frozen=True)
class FoldBounds:
    """Target-index ranges of one fold of one series: [start, stop) each, in time order."""

    train_start: int
    val_start: int  # = train stop
    test_start: int  # = validation stop
    test_stop: int

    @property
    def train(self) -> slice:
        return slice(self.train_start, self.val_start)

    @property
    def val(self) -> slice:
        return slice(self.val_start, self.test_start)

    @property
    def test(self) -> slice:
        return slice(self.test_start, self.test_stop)


def fold_bounds(
    n_targets: int,
    folds: int,
    *,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    scheme: Scheme = "expanding",
) -> list[FoldBounds]:
    """The ``folds`` folds of a series with ``n_targets`` (window, target) pairs.

    ``eval_fraction`` of the targets (the newest) are tested, in ``folds`` near-equal
    consecutive blocks; ``val_fraction`` is the share of each fold's fitting span kept for
    early stopping (its newest part). Rolling folds all fit on as many targets as the
    first fold does. Raises :class:`ValueError` when a fold would get no training,
    validation or test target.
    """
    if folds < 1:
        raise ValueError(f"the number of walk-forward folds must be at least 1, got {folds}")
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must lie strictly between 0 and 1, got {eval_fraction}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    if scheme not in ("expanding", "rolling"):
        raise ValueError(f"unknown walk-forward scheme {scheme!r}; use expanding or rolling")
    tested = max(folds, round(n_targets * eval_fraction))
    first_test = n_targets - tested
    if first_test < 2:
        raise ValueError(
            f"{n_targets} targets leave {max(first_test, 0)} for fitting before the first of "
            f"{folds} test block(s); at least 2 (one training, one validation) are needed"
        )
    edges = first_test + np.linspace(0, tested, folds + 1).round().astype(int)
    bounds = []
    for test_start, test_stop in itertools.pairwise(edges):
        fit_start = 0 if scheme == "expanding" else int(test_start) - first_test
        fit = int(test_start) - fit_start
        val = min(max(1, round(fit * val_fraction)), fit - 1)
        bounds.append(FoldBounds(fit_start, int(test_start) - val, int(test_start), int(test_stop)))
    return bounds


def common_fold_bounds(
    series: Sequence[PriceSeries],
    folds: int,
    *,
    window_length: int,
    eval_fraction: float,
    val_fraction: float,
    scheme: Scheme,
    skip_uncovered: bool = False,
) -> dict[int, list[FoldBounds]]:
    """Fold bounds at the same event times for every series (series index -> its folds).

    The folds are cut from the time all series' targets cover, as :func:`fold_bounds`
    cuts a series' targets but over equal slots of time (so a symbol that ticks faster
    than the others does not move them), and each boundary's event time is then found in
    every series: within a fold no training target of any series is later than another
    series' validation or test target. A series without a target in some period of some
    fold is a :class:`DataError`, or left out with a log line if ``skip_uncovered``.
    """
    target_ts = [one.ts[window_length:] for one in series]
    first, last = covered_time(target_ts)
    span = last - first + 1
    slot_folds = fold_bounds(
        TIME_SLOTS, folds, eval_fraction=eval_fraction, val_fraction=val_fraction, scheme=scheme
    )
    per_series: dict[int, list[FoldBounds]] = {}
    for index, (one, ts) in enumerate(zip(series, target_ts, strict=True)):
        bounds: list[FoldBounds] = []
        problem = None
        for fold in slot_folds:
            # Where each slot begins in event time; slot TIME_SLOTS begins after the last.
            edges = [
                first + span * slot // TIME_SLOTS
                for slot in (fold.train_start, fold.val_start, fold.test_start, fold.test_stop)
            ]
            own = FoldBounds(*(int(i) for i in np.searchsorted(ts, edges)))
            counts = (
                own.val_start - own.train_start,
                own.test_start - own.val_start,
                own.test_stop - own.test_start,
            )
            problem = problem or uncovered_split(one, counts, (edges[1], edges[2]))
            bounds.append(own)
        if problem and skip_uncovered:
            logger.info("leaving out %s", problem)
            continue
        if problem:
            raise DataError(
                f"{problem} (walk-forward fold boundaries are common to all series); leave it "
                "out, or split each series by its own length"
            )
        per_series[index] = bounds
    if not per_series:
        raise DataError("no series has a target in each period of every walk-forward fold")
    return per_series


def walk_forward_splits(
    series: Sequence[PriceSeries],
    folds: int,
    *,
    window_length: int = 60,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    scheme: Scheme = "expanding",
    split_by: SplitBy = "series",
    skip_uncovered: bool = False,
) -> list[ChronologicalSplit]:
    """One :class:`ChronologicalSplit` per fold; each series is cut by its own length
    (``split_by="series"``) or all at the same event times (``"time"``, see
    :func:`common_fold_bounds`).

    Fold k of every series is concatenated into split k (no window crosses two series).
    A fold's ``cuts`` describe the rows it used: each cut's series is the slice from the
    first training window's oldest price to the last test target.
    """
    if not series:
        raise DataError("no price series to split")
    if split_by == "time":
        bounds_of = common_fold_bounds(
            series,
            folds,
            window_length=window_length,
            eval_fraction=eval_fraction,
            val_fraction=val_fraction,
            scheme=scheme,
            skip_uncovered=skip_uncovered,
        )
    else:
        bounds_of = {}
        for index, one in enumerate(series):
            try:
                bounds_of[index] = fold_bounds(
                    max(len(one) - window_length, 0),
                    folds,
                    eval_fraction=eval_fraction,
                    val_fraction=val_fraction,
                    scheme=scheme,
                )
            except ValueError as exc:
                raise DataError(
                    f"{one.source} ({one.symbol}) has {len(one)} rows, too few for {folds} "
                    f"walk-forward folds with a window length of {window_length}: {exc}"
                ) from exc
    per_fold: list[dict[str, list[WindowSet]]] = [
        {"train": [], "val": [], "test": []} for _ in range(folds)
    ]
    cuts: list[list[SeriesCut]] = [[] for _ in range(folds)]
    for index, (position, bounds) in enumerate(bounds_of.items()):
        one = series[position]
        windows, targets = make_windows(one.prices, window_length)
        target_ts = one.ts[window_length:]
        for k, fold in enumerate(bounds):
            for name, rows in (("train", fold.train), ("val", fold.val), ("test", fold.test)):
                per_fold[k][name].append(
                    WindowSet(
                        windows[rows],
                        targets[rows],
                        target_ts[rows],
                        np.full(rows.stop - rows.start, index, dtype=np.int64),
                    )
                )
            used = slice(fold.train_start, fold.test_stop + window_length)
            cuts[k].append(
                SeriesCut(
                    PriceSeries(one.symbol, one.source, one.ts[used], one.prices[used]),
                    train=fold.val_start - fold.train_start,
                    val=fold.test_start - fold.val_start,
                    test=fold.test_stop - fold.test_start,
                )
            )
    return [
        ChronologicalSplit(
            train=_concat(parts["train"]),
            val=_concat(parts["val"]),
            test=_concat(parts["test"]),
            cuts=tuple(fold_cuts),
            window_length=window_length,
        )
        for parts, fold_cuts in zip(per_fold, cuts, strict=True)
    ]


def _concat(sets: list[WindowSet]) -> WindowSet:
    return WindowSet(
        np.concatenate([s.windows for s in sets]),
        np.concatenate([s.targets for s in sets]),
        np.concatenate([s.target_ts for s in sets]),
        np.concatenate([s.series_index for s in sets]),
    )


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class FoldResult:
    """One fold: its data, the model trained on it and its test predictions."""

    index: int
    split: ChronologicalSplit
    training: TrainResult
    test_predicted: np.ndarray
    evaluation: dict[str, Any]  # evaluate_forecasts() on the fold's test windows


@dataclass(frozen=True)
class WalkForwardResult:
    folds: list[FoldResult]
    summary: dict[str, Any] = field(repr=False)  # JSON-ready, see summarize()

    @property
    def final(self) -> FoldResult:
        """The newest fold: its model is the candidate checkpoint."""
        return self.folds[-1]


def significance(actual: np.ndarray, predicted: np.ndarray, last: np.ndarray) -> dict[str, Any]:
    """Figures vs naive plus the DM test (HLN) and a 95 % block-bootstrap CI of the ratio."""
    figures = evaluate_forecasts(actual, predicted, last)
    model_errors, naive_errors = predicted - actual, last - actual
    figures["diebold_mariano"] = diebold_mariano(model_errors, naive_errors).as_dict()
    low, high = block_bootstrap_rmse_ratio(model_errors, naive_errors)
    figures["rmse_ratio_ci95"] = [low, high]
    return figures


def summarize(folds: Sequence[FoldResult], series: Sequence[PriceSeries]) -> dict[str, Any]:
    """Per fold, per series over all folds, and overall figures (JSON-ready).

    With several series, ``overall`` is scale-free: each series' errors are divided by its
    naive RMSE over the evaluated span before pooling, so a series priced in thousands does
    not drown one priced near 1. With one series ``overall`` stays in its price units.
    """
    actual = np.concatenate([f.split.test.targets for f in folds])
    predicted = np.concatenate([f.test_predicted for f in folds])
    last = np.concatenate([f.split.test.last for f in folds])
    which = np.concatenate([f.split.test.series_index for f in folds])
    per_series = {
        one.symbol: significance(actual[which == i], predicted[which == i], last[which == i])
        for i, one in enumerate(series)
    }
    # One series: its own price units, as in the folds.
    scale = naive_scale(last, actual, which, several=len(series) > 1)
    pooled = np.isfinite(scale)  # thin or flat series stay out of the pooled figure
    overall = significance(
        actual[pooled] / scale[pooled],
        predicted[pooled] / scale[pooled],
        last[pooled] / scale[pooled],
    )
    return {
        "folds": [
            {
                "fold": f.index,
                "train_windows": len(f.split.train),
                "val_windows": len(f.split.val),
                "test_windows": len(f.split.test),
                "test_start": f.split.cuts[0].series.iso_range(
                    len(f.split.cuts[0].series) - f.split.cuts[0].test
                )[0],
                "test_end": f.split.cuts[0].series.iso_range()[1],
                "best_epoch": f.training.best_epoch,
                "seconds": round(f.training.seconds, 3),
                **{k: f.evaluation[k] for k in ("gru", "naive", "rmse_ratio")},
            }
            for f in folds
        ],
        "series": per_series,
        "overall": overall,
    }


def run_walk_forward(
    series: Sequence[PriceSeries],
    folds: int,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    scheme: Scheme = "expanding",
    split_by: SplitBy = "series",
    skip_uncovered: bool = False,
    progress: bool = True,
) -> WalkForwardResult:
    """Train and score one model per fold (same configs and seed) and summarize."""
    splits = walk_forward_splits(
        series,
        folds,
        window_length=model_config.window_length,
        eval_fraction=eval_fraction,
        val_fraction=val_fraction,
        scheme=scheme,
        split_by=split_by,
        skip_uncovered=skip_uncovered,
    )
    results = []
    for index, split in enumerate(splits, start=1):
        training, predicted, evaluation = train_and_score(
            split, model_config, train_config, progress=progress
        )
        logger.info(
            "walk-forward fold %d/%d: %d train, %d val, %d test windows; ratio %.5f",
            index,
            folds,
            len(split.train),
            len(split.val),
            len(split.test),
            evaluation["rmse_ratio"],
        )
        results.append(FoldResult(index, split, training, predicted, evaluation))
    kept = [cut.series for cut in splits[0].cuts]  # a common time split can leave some out
    return WalkForwardResult(results, summarize(results, kept))


def train_and_score(
    split: ChronologicalSplit,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    progress: bool = True,
) -> tuple[TrainResult, np.ndarray, dict[str, Any]]:
    """Train on a split's train windows (early-stopping on val), score its test windows."""
    training = train_model(
        split.train.windows,
        split.train.targets,
        split.val.windows,
        split.val.targets,
        model_config,
        train_config,
        progress=progress,
    )
    predicted = predict_windows(training.model, split.test.windows)
    return training, predicted, evaluate_forecasts(split.test.targets, predicted, split.test.last)


def _num(value: float | None, digits: int = 6) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def format_walk_forward(summary: dict[str, Any]) -> str:
    """The walk-forward table the retrain job prints."""
    header = (
        f"  {'':<16}{'windows':>8}{'RMSE':>12}{'naive RMSE':>12}{'MAE':>12}"
        f"{'direction':>10}{'ratio':>9}"
    )

    def row(label: str, figures: dict[str, Any], windows: int) -> str:
        direction = figures["gru"]["directional_accuracy"]
        return (
            f"  {label:<16}{windows:>8}{_num(figures['gru']['rmse']):>12}"
            f"{_num(figures['naive']['rmse']):>12}{_num(figures['gru']['mae']):>12}"
            f"{'n/a' if direction is None else f'{direction:.3f}':>10}"
            f"{figures['rmse_ratio']:>9.4f}"
        )

    lines = [f"walk-forward, {len(summary['folds'])} fold(s) (model vs naive next = last):", header]
    for fold in summary["folds"]:
        label = f"fold {fold['fold']} {fold['test_start'][:10]}"
        lines.append(row(label, fold, fold["test_windows"]))
    several = len(summary["series"]) > 1
    for symbol, figures in summary["series"].items():
        if several:
            lines.append(row(f"all: {symbol}"[:16], figures, figures["windows"]))
    overall = summary["overall"]
    if several:
        lines.append("  overall (errors scaled by each series' naive RMSE):")
    lines.append(row("overall", overall, overall["windows"]))
    dm = overall["diebold_mariano"]
    low, high = overall["rmse_ratio_ci95"]
    lines.append(
        f"  ratio {overall['rmse_ratio']:.4f}, 95% block-bootstrap CI [{low:.4f}, {high:.4f}]; "
        f"Diebold-Mariano (HLN) vs naive: stat {dm['statistic']:.3f}, "
        f"p(better) {dm['p_better']:.3g}, p(two-sided) {dm['p_value']:.3g}"
    )
    return "\n".join(lines)
