"""The retrain job: ``tickcast retrain`` / ``python -m model``.

Load → split in time → train → evaluate on the held-out test split against the naive
forecast → save a checkpoint (with ``predictions.png`` beside it) → promote it to
``LATEST`` only if it is not worse than the checkpoint in service on the same test targets
that neither model was fitted on (see :func:`decide_promotion`). The three stages are
separate functions (:func:`load_training_data`, :func:`fit_and_evaluate`,
:func:`decide_promotion`) so that other data sources and walk-forward evaluation can reuse
them.

With several series, RMSE ratios and the promotion gate are scale-free: each series' errors
are divided by that series' naive RMSE before pooling, as in
:func:`model.walk_forward.summarize`; pooled in price units, a series priced in the
thousands (BTCUSD: 14 of 2,560 test windows of the five bundled data sets, ~99.8 % of their
naive squared error) would decide alone.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from model.arguments import non_negative_int
from model.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointMeta,
    DataRange,
    load_latest,
    new_version,
    promote,
    read_latest,
    read_meta,
    save_checkpoint,
)
from model.data import (
    ChronologicalSplit,
    DataError,
    PriceSeries,
    SeriesCut,
    SplitBy,
    chronological_split,
    load_many,
)
from model.evaluate import naive_scale, plot_predictions, predict_windows, rmse_ratio
from model.gru import ModelConfig
from model.kafka_access import KafkaAccess
from model.kafka_source import epoch_ms, load_kafka_series, parse_duration, parse_since
from model.train import TrainConfig, TrainResult, resolve_device
from model.walk_forward import (
    DEFAULT_EVAL_FRACTION,
    WalkForwardResult,
    fold_bounds,
    format_walk_forward,
    run_walk_forward,
    train_and_score,
)

logger = logging.getLogger(__name__)

CHECKPOINT_DIR_ENV = "TICKCAST_CHECKPOINT_DIR"
DEFAULT_CHECKPOINT_DIR = "./checkpoints"
PLOT_FILE = "predictions.png"
# A plain file with a dot-name: never taken for a version directory (those are directories
# whose names do not start with a dot, and LATEST may not name a dot-name).
PROMOTE_LOCK_FILE = ".promote.lock"
EXIT_USAGE = 2  # bad input: missing file, unknown data set, NaN prices, too few rows
EXIT_FAILURE = 1
# The loss the retrain job trains with unless --loss says otherwise: it beat "scaled" on the
# development walk-forward (README.md, "Model quality").
RETRAIN_LOSS = "relative"
# --from-kafka reads at most this many records by default: ~1 KB of memory each, from the
# read to the scaled training windows (README, "Retraining").
DEFAULT_MAX_TICKS = 1_000_000


@dataclass(frozen=True)
class FitOutcome:
    """One model trained on a split and scored on its held-out test windows.

    ``evaluation`` is :func:`model.evaluate.evaluate_forecasts` on the test split (RMSE and
    MAE in price units, pooled over the series) except ``rmse_ratio``, which is
    :func:`held_out_rmse_ratio`: scale-free with several series. Build it with
    :meth:`scored` so that the ratio is always that one.
    """

    split: ChronologicalSplit
    training: TrainResult
    test_predicted: np.ndarray
    evaluation: dict[str, Any]

    @classmethod
    def scored(
        cls,
        split: ChronologicalSplit,
        training: TrainResult,
        test_predicted: np.ndarray,
        evaluation: dict[str, Any],
    ) -> FitOutcome:
        ratio = held_out_rmse_ratio(split, test_predicted)
        return cls(split, training, test_predicted, {**evaluation, "rmse_ratio": ratio})

    @property
    def rmse(self) -> float:
        return float(self.evaluation["gru"]["rmse"])


@dataclass(frozen=True)
class PromotionDecision:
    """The gate's verdict; the RMSEs are on the ``compared_windows`` it compared (see
    :func:`decide_promotion` for their units), None where nothing was compared."""

    promote: bool
    reason: str
    incumbent_version: str | None = None
    incumbent_rmse: float | None = None
    candidate_rmse: float | None = None
    compared_windows: int | None = None


def load_training_data(specs: list[str]) -> list[PriceSeries]:
    """The series to train on; :class:`DataError` if any spec is unusable."""
    series = load_many(specs)
    for one in series:
        logger.info("loaded %s from %s: %d rows", one.symbol, one.source, len(one))
    return series


def fit_and_evaluate(
    series: list[PriceSeries],
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_by: SplitBy = "series",
    skip_uncovered: bool = False,
    progress: bool = True,
) -> FitOutcome:
    """Split chronologically, train on train (early-stopping on val), score on test.

    ``split_by`` and ``skip_uncovered`` are :func:`model.data.chronological_split`'s."""
    split = chronological_split(
        series,
        val_fraction,
        test_fraction,
        model_config.window_length,
        split_by=split_by,
        skip_uncovered=skip_uncovered,
    )
    logger.info(
        "windows: %d train, %d validation, %d test (window length %d, %d series)",
        len(split.train),
        len(split.val),
        len(split.test),
        split.window_length,
        len(split.cuts),
    )
    training, predicted, evaluation = train_and_score(
        split, model_config, train_config, progress=progress
    )
    return FitOutcome.scored(split, training, predicted, evaluation)


# --------------------------------------------------------------------------- scale-free RMSE


def scaled_rmse(predicted: np.ndarray, targets: np.ndarray, scale: np.ndarray) -> float:
    """RMSE of errors divided by ``scale``; windows whose scale is NaN are left out."""
    return float(np.sqrt(np.nanmean(((predicted - targets) / scale) ** 2)))


def held_out_rmse_ratio(split: ChronologicalSplit, predicted: np.ndarray) -> float:
    """RMSE(model) / RMSE(naive) on the test split, scale-free with several series.

    Each series' errors (model and naive) are divided by that series' naive RMSE on the test
    windows before pooling; with one series this is the plain ratio in price units.
    """
    test = split.test
    scale = naive_scale(test.last, test.targets, test.series_index, several=len(split.cuts) > 1)
    return rmse_ratio(
        scaled_rmse(predicted, test.targets, scale), scaled_rmse(test.last, test.targets, scale)
    )


# --------------------------------------------------------------------------- promotion gate


def _epoch_ms(stamp: str) -> int | None:
    """An ISO-8601 time (UTC unless it says otherwise) in epoch ms; None if unreadable."""
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # DataRange times are written in UTC
    return epoch_ms(moment)


def trained_through(meta: CheckpointMeta) -> dict[str, int]:
    """Per symbol, the time (epoch ms) of the newest row the checkpoint was fitted on.

    ``meta.training_data`` ends cover training and validation rows (early stopping looked
    at validation, so it is in-sample too). An end that cannot be read counts as reaching
    forever: better to compare on fewer windows than on data the model may have seen.
    """
    ends: dict[str, int] = {}
    for data in meta.training_data:
        end = _epoch_ms(data.end)
        if end is None:
            logger.warning(
                "checkpoint %s: training end %r of %s is not an ISO time; treating all of "
                "%s as seen",
                meta.version,
                data.end,
                data.symbol,
                data.symbol,
            )
            end = int(np.iinfo(np.int64).max)
        ends[data.symbol] = max(end, ends.get(data.symbol, end))
    return ends


def out_of_sample(split: ChronologicalSplit, meta: CheckpointMeta) -> np.ndarray:
    """Which test targets come after the newest row ``meta``'s model was fitted on for
    their symbol; a symbol it was never fitted on is out of sample throughout."""
    test = split.test
    ends = trained_through(meta)
    keep = np.ones(len(test), dtype=bool)
    for index, cut in enumerate(split.cuts):
        end = ends.get(cut.series.symbol)
        if end is not None:
            rows = test.series_index == index
            keep[rows] = test.target_ts[rows] > end
    return keep


def held_out_windows(split: ChronologicalSplit, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The test targets' windows of ``length`` prices, and which targets have that much
    history: a model with another window length can then be scored on the same targets.

    A cut's test targets are the last ``cut.test`` rows of its series (also for walk-forward
    folds, whose cut series end at the fold's last test target), in test-set order.
    """
    test = split.test
    if length == split.window_length:
        return test.windows, np.ones(len(test), dtype=bool)
    windows = np.zeros((len(test), length))
    has_history = np.zeros(len(test), dtype=bool)
    for index, cut in enumerate(split.cuts):
        rows = np.flatnonzero(test.series_index == index)
        prices = cut.series.prices
        target_rows = np.arange(len(prices) - cut.test, len(prices))
        if not np.array_equal(prices[target_rows], test.targets[rows]):
            raise ValueError(f"split cut {index} does not end at its test targets")
        enough = target_rows >= length
        all_windows = np.lib.stride_tricks.sliding_window_view(prices, length)
        windows[rows[enough]] = all_windows[target_rows[enough] - length]
        has_history[rows] = enough
    return windows, has_history


def decide_promotion(
    checkpoint_dir: Path,
    split: ChronologicalSplit,
    candidate_predicted: np.ndarray,
    *,
    force: bool = False,
    device: torch.device | str = "cpu",
) -> PromotionDecision:
    """Promote unless the checkpoint in service does better on the same unseen targets.

    ``candidate_predicted`` are the candidate's predictions for ``split.test``. The two
    models are compared on the test targets that lie after the newest row the incumbent was
    fitted on for that symbol (its ``meta.training_data``; a symbol it never saw counts,
    and so does every symbol of a checkpoint that records no training data), so an
    incumbent is never scored on its own training data. Each model predicts from its own
    window length: the incumbent's windows are cut from the same series for the same
    targets, and targets with too little history for it are left out for both.

    RMSE: with several series, each series' errors are divided by its naive RMSE over the
    compared windows before pooling (:func:`model.evaluate.naive_scale`); with one series,
    price units.

    - Ties promote (the newer data wins); ``force`` promotes regardless.
    - No checkpoint in service, or one that cannot be loaded: promote (with a warning).
    - No target left to compare on: keep the incumbent, with a warning, rather than
      promote untested. Nothing shows the candidate is better, and (the usual cause) the
      incumbent was fitted on everything the candidate is tested on, i.e. on data at least
      as new as the candidate's: replacing it would drop that for no measured gain. The
      next run with newer data compares again; ``--force`` promotes anyway.

    Raises :class:`CheckpointError` (or :class:`OSError`) when ``LATEST`` cannot be read.
    The caller holds :func:`promotion_lock`, so ``LATEST`` stays what this decided against.
    """
    if force:
        return PromotionDecision(True, "--force given")
    if read_latest(checkpoint_dir) is None:
        return PromotionDecision(True, "no checkpoint in service yet")
    try:
        incumbent = load_latest(checkpoint_dir, device)
    except CheckpointError as exc:
        logger.warning("the checkpoint in service cannot be loaded; promoting anyway: %s", exc)
        return PromotionDecision(True, f"checkpoint in service cannot be loaded ({exc})")
    return _compare_with(incumbent, split, candidate_predicted)


def _compare_with(
    incumbent: Checkpoint, split: ChronologicalSplit, candidate_predicted: np.ndarray
) -> PromotionDecision:
    test = split.test
    if not incumbent.meta.training_data:
        logger.warning(
            "checkpoint in service %s records no training data: assuming it saw none of the "
            "test windows",
            incumbent.version,
        )
    unseen = out_of_sample(split, incumbent.meta)
    incumbent_windows, has_history = held_out_windows(split, incumbent.meta.window_length)
    compared = unseen & has_history
    left_out = _left_out(incumbent, int((~unseen).sum()), int((unseen & ~has_history).sum()))
    if not compared.any():
        reason = (
            f"no out-of-sample comparison possible: none of the {len(test)} test windows is "
            f"usable ({left_out}); kept {incumbent.version} in service (--force promotes)"
        )
        logger.warning("%s", reason)
        return PromotionDecision(False, reason, incumbent.version, compared_windows=0)
    targets, last = test.targets[compared], test.last[compared]
    scale = naive_scale(last, targets, test.series_index[compared], several=len(split.cuts) > 1)
    candidate_rmse = scaled_rmse(candidate_predicted[compared], targets, scale)
    incumbent_predicted = predict_windows(incumbent.model, incumbent_windows[compared])
    incumbent_rmse = scaled_rmse(incumbent_predicted, targets, scale)
    n = int(compared.sum())
    comparison = (
        f"RMSE {candidate_rmse:.6g} vs {incumbent_rmse:.6g} for {incumbent.version} in "
        f"service, on the same {n} test windows"
    )
    if n < len(test):
        comparison += f" of {len(test)} ({left_out})"
    if len(split.cuts) > 1:
        comparison += "; errors scaled by each series' naive RMSE"
        if unscaled := int(np.isnan(scale).sum()):
            comparison += (
                f" ({unscaled} windows of series with too few windows to scale, or flat, left out)"
            )
    if incumbent.meta.window_length != split.window_length:
        comparison += (
            f"; each model on its own window length ({split.window_length} vs "
            f"{incumbent.meta.window_length})"
        )
    not_worse = candidate_rmse <= incumbent_rmse
    return PromotionDecision(
        not_worse,
        f"{'not worse' if not_worse else 'worse'}: {comparison}",
        incumbent.version,
        incumbent_rmse,
        candidate_rmse,
        n,
    )


def _left_out(incumbent: Checkpoint, seen: int, short: int) -> str:
    """Why test windows were not compared, for the reason text."""
    parts = []
    if seen:
        parts.append(f"{seen} with targets inside {incumbent.version}'s training data")
    if short:
        parts.append(
            f"{short} with fewer rows before them than its window length "
            f"{incumbent.meta.window_length}"
        )
    return ", ".join(parts)


@contextmanager
def promotion_lock(checkpoint_dir: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<checkpoint_dir>/.promote.lock``, waiting for it.

    Two retrains at once (the ``--every`` scheduler and a manual run) would each decide
    against the ``LATEST`` they read, and the later one would overwrite a better checkpoint
    promoted in between; holding this around (read ``LATEST``, decide, promote) serialises
    them. The kernel drops a flock when its file is closed, also when the process dies, so a
    crashed run leaves no stale lock.
    """
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_dir / PROMOTE_LOCK_FILE
    with path.open("a") as handle:  # "a": created if missing, never truncated
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another retrain to finish promoting (%s is locked)", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# --------------------------------------------------------------------------- data ranges


def _row_range(cut: SeriesCut, start: int, stop: int) -> DataRange:
    first, last = cut.series.iso_range(start, stop)
    return DataRange(
        source=cut.series.source,
        symbol=cut.series.symbol,
        start=first,
        end=last,
        rows=stop - start,
    )


def training_ranges(split: ChronologicalSplit) -> list[DataRange]:
    """Per series, the rows used for fitting (training and validation): a prefix."""
    return [_row_range(cut, 0, cut.fit_rows) for cut in split.cuts]


def held_out_ranges(split: ChronologicalSplit) -> list[DataRange]:
    """Per series, the test targets' rows (their windows reach back into earlier rows)."""
    return [_row_range(cut, len(cut.series) - cut.test, len(cut.series)) for cut in split.cuts]


# --------------------------------------------------------------------------- CLI


def add_retrain_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the retrain flags to ``parser`` (``tickcast retrain`` and ``python -m model``)."""
    model_defaults = ModelConfig()
    train_defaults = TrainConfig()
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data",
        action="append",
        metavar="SPEC",
        help="a CSV/Parquet file (Date,Close or symbol,ts,price) or dataset:NAME "
        "(nasdaq, sp500, goog, eurusd, btcusd); repeat to train one model on several",
    )
    source.add_argument(
        "--from-kafka",
        action="store_true",
        help="train on the ticks retained in the input topic (the daemon's own stream)",
    )
    kafka = parser.add_argument_group(
        "--from-kafka",
        "security as for the daemon: $TICKCAST_SECURITY_PROTOCOL, $TICKCAST_SASL_MECHANISM, "
        "$TICKCAST_SASL_USERNAME, $TICKCAST_SASL_PASSWORD, $TICKCAST_SSL_CAFILE",
    )
    kafka.add_argument(
        "--bootstrap-servers", help="default: $TICKCAST_BOOTSTRAP_SERVERS, else localhost:9092"
    )
    kafka.add_argument("--input-topic", help="default: $TICKCAST_INPUT_TOPIC, else ticks")
    kafka.add_argument(
        "--since",
        type=_since_arg,
        metavar="WHEN",
        help="only records written since WHEN: a duration back from each run (7d, 12h) or "
        "an ISO time (2024-05-01T00:00Z); by Kafka record timestamp",
    )
    kafka.add_argument(
        "--max-ticks",
        type=_max_ticks_arg,
        default=DEFAULT_MAX_TICKS,
        metavar="N",
        help="read at most the newest N records (all partitions cut at one record time; "
        f"0: no limit; default {DEFAULT_MAX_TICKS:,}): about 1 KB of memory per tick read, "
        "and training time in proportion",
    )
    parser.add_argument(
        "--every",
        type=parse_duration,
        metavar="DURATION",
        help="keep running: retrain, promote if not worse, sleep DURATION (1h, 30m, 90s), "
        "repeat; SIGTERM stops it between runs",
    )
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help=f"where checkpoints live (default: ${CHECKPOINT_DIR_ENV}, else "
        f"{DEFAULT_CHECKPOINT_DIR})",
    )
    parser.add_argument(
        "--epochs", type=int, help=f"at most this many (default {train_defaults.epochs})"
    )
    parser.add_argument(
        "--patience", type=int, help=f"early stopping (default {train_defaults.patience})"
    )
    parser.add_argument(
        "--max-train-time",
        type=parse_duration,
        metavar="DURATION",
        help="stop training this long (30m, 1h) into it, within an epoch if need be, "
        "keeping the best epoch so far; such runs no longer repeat exactly (default: no "
        "limit)",
    )
    parser.add_argument("--seed", type=int, help=f"default {train_defaults.seed}")
    parser.add_argument("--batch-size", type=int, help=f"default {train_defaults.batch_size}")
    parser.add_argument(
        "--lr", type=float, help=f"Adam learning rate (default {train_defaults.lr})"
    )
    parser.add_argument("--hidden-size", type=int, help=f"default {model_defaults.hidden_size}")
    parser.add_argument(
        "--loss",
        choices=("scaled", "relative"),
        default=RETRAIN_LOSS,
        help="training loss: MSE of per-window-scaled prices, or weighted by (span / last "
        f"price)^2 so it tracks the price error (default {RETRAIN_LOSS}; see "
        "README.md, 'Model quality')",
    )
    parser.add_argument(
        "--window-length",
        type=int,
        help=f"prices per window (default {model_defaults.window_length})",
    )
    parser.add_argument(
        "--split",
        choices=("series", "time"),
        default="series",
        help="with several series: cut each at its own shares of its targets (series, "
        "default; a series' test period can then lie before another's training data), or "
        "all at the same event times (time: no training target is later than any "
        "validation or test target; a series outside one of the periods is an error, or "
        "left out with --from-kafka)",
    )
    parser.add_argument("--val-fraction", type=float, default=0.15, help="default 0.15")
    parser.add_argument("--test-fraction", type=float, default=0.15, help="default 0.15")
    parser.add_argument(
        "--walk-forward",
        type=int,
        metavar="K",
        help="evaluate on K successive walk-forward folds instead of one split: the newest "
        "--walk-forward-span of each series is tested in K blocks, each by a model trained "
        "only on what came before (validation = the newest --val-fraction of that); the "
        "last fold's model is the candidate, gated on the last fold's test windows",
    )
    parser.add_argument(
        "--walk-forward-span",
        type=float,
        default=DEFAULT_EVAL_FRACTION,
        help=f"share of each series tested by the walk-forward folds (default "
        f"{DEFAULT_EVAL_FRACTION})",
    )
    parser.add_argument(
        "--walk-forward-scheme",
        choices=("expanding", "rolling"),
        default="expanding",
        help="fit each fold on everything before its test block (expanding, default) or "
        "on a fixed-length span just before it (rolling)",
    )
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="promote to LATEST even if worse than the one in service",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _given(args: argparse.Namespace, mapping: dict[str, str]) -> dict[str, Any]:
    return {
        field: getattr(args, flag)
        for flag, field in mapping.items()
        if getattr(args, flag, None) is not None
    }


def _configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    model_config = ModelConfig(
        **_given(args, {"hidden_size": "hidden_size", "window_length": "window_length"})
    )
    train_config = TrainConfig(
        **_given(
            args,
            {
                "epochs": "epochs",
                "patience": "patience",
                "seed": "seed",
                "batch_size": "batch_size",
                "lr": "lr",
                "loss": "loss",
                "device": "device",
            },
        ),
        **(
            {"max_seconds": args.max_train_time.total_seconds()}
            if getattr(args, "max_train_time", None)
            else {}
        ),
    )
    return model_config, train_config


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"tickcast retrain: error: {message}", file=sys.stderr)
    return code


def _since_arg(text: str) -> str:
    """argparse type for --since: validated now, resolved at each run (``7d`` moves on)."""
    try:
        parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def _max_ticks_arg(text: str) -> int | None:
    """argparse type for --max-ticks: a count, 0 for no limit (None)."""
    return non_negative_int(text) or None


def kafka_training_data(args: argparse.Namespace, window_length: int) -> list[PriceSeries]:
    """--from-kafka: the ticks retained in the input topic, one series per symbol."""
    flags = {"bootstrap_servers": args.bootstrap_servers, "input_topic": args.input_topic}
    try:
        access = KafkaAccess(**{name: value for name, value in flags.items() if value})
    except ValidationError as exc:
        problems = "; ".join(
            f"TICKCAST_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        )
        raise DataError(f"invalid Kafka setting: {problems}") from exc
    since_ms = parse_since(args.since) if args.since else None
    # chronological_split needs a window, a next price, and one row each for val and test.
    ticks = load_kafka_series(
        access,
        min_ticks=window_length + 3,
        since_ms=since_ms,
        max_records=args.max_ticks,
    )
    logger.info("training data from %s: %s", access.input_topic, json.dumps(ticks.summary()))
    folds = getattr(args, "walk_forward", None)
    if folds is None or args.split == "time":
        return ticks.series  # a common time split leaves out what it cannot cover itself
    # A symbol that just appeared on the topic must not fail the whole walk-forward run.
    usable = []
    for one in ticks.series:
        try:
            fold_bounds(
                max(len(one) - window_length, 0),
                folds,
                eval_fraction=args.walk_forward_span,
                val_fraction=args.val_fraction,
                scheme=args.walk_forward_scheme,
            )
        except ValueError:
            logger.info(
                "skipping %s: %d ticks, too few for %d walk-forward folds",
                one.symbol,
                len(one),
                folds,
            )
            continue
        usable.append(one)
    return usable


class _StopBetweenRuns:
    """SIGTERM/SIGINT: finish the current run, then stop; a second signal stops at once."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopBetweenRuns:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.requested.is_set():
            raise KeyboardInterrupt  # the second signal: do not wait for the run to end
        self.requested.set()
        logger.info("%s: stopping after the current run", signal.Signals(signum).name)


def run_retrain_command(args: argparse.Namespace) -> int:
    """``tickcast retrain`` and ``python -m model``: :func:`run_retrain` with timestamped
    INFO logs (what the scheduler, the promotion and the Kafka read report) and Ctrl-C
    answered with a line rather than a traceback."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return run_retrain(args)
    except KeyboardInterrupt:
        print("tickcast retrain: interrupted; nothing was promoted", file=sys.stderr)
        return 130


def run_retrain(args: argparse.Namespace) -> int:
    """Run the retrain job for parsed ``args`` (once, or every ``--every``); exit code."""
    every = getattr(args, "every", None)
    if every is None:
        return retrain_once(args)
    # Flags no run can use would fail every run, quietly, for as long as it is scheduled.
    if (problem := _usage_problem(args)) is not None:
        return _fail(problem)
    runs = failed = 0
    with _StopBetweenRuns() as stop:
        while not stop.requested.is_set():
            runs += 1
            code = _scheduled_run(args, runs)
            if code == EXIT_USAGE and runs == 1 and not args.from_kafka:
                return code  # a data file or set that cannot be used will not become usable
            if code != 0:
                failed += 1
            logger.info("retrain run %d done; next in %s", runs, every)
            stop.requested.wait(every.total_seconds())
    logger.info("retrain scheduler stopped after %d runs (%d failed)", runs, failed)
    return 0


def _scheduled_run(args: argparse.Namespace, run: int) -> int:
    """One run of the ``--every`` scheduler; its exit code, never its exception.

    A scheduler outlives one bad run (a topic still filling, a broker restart, a CUDA
    error, a bug that one batch of data trips): any :class:`Exception` is logged with its
    traceback and counted as a failed run. KeyboardInterrupt and SystemExit are not
    Exceptions, so a second SIGTERM/SIGINT still stops the scheduler at once.
    """
    try:
        code = retrain_once(args)
    except Exception:
        logger.exception("retrain run %d failed with an unexpected error", run)
        return EXIT_FAILURE
    if code != 0:
        logger.warning("retrain run %d failed with exit code %d", run, code)
    return code


def _usage_problem(args: argparse.Namespace) -> str | None:
    """What makes these flags unusable for any run (settings, device, split flags)."""
    try:
        _, train_config = _configs(args)
        resolve_device(train_config.device)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
            for e in exc.errors()
        )
        return f"invalid setting: {problems}"
    except ValueError as exc:
        return str(exc)
    return _invalid_flags(args)


def _invalid_flags(args: argparse.Namespace) -> str | None:
    """What is wrong with the split flags, if anything (argparse cannot check ranges)."""
    for flag, fraction in (
        ("--val-fraction", args.val_fraction),
        ("--test-fraction", args.test_fraction),
    ):
        if not 0 < fraction < 0.5:
            return f"{flag} must lie strictly between 0 and 0.5, got {fraction}"
    folds = getattr(args, "walk_forward", None)
    if folds is not None and folds < 1:
        return f"--walk-forward must be at least 1, got {folds}"
    if folds is not None and not 0 < args.walk_forward_span < 1:
        return (
            f"--walk-forward-span must lie strictly between 0 and 1, got {args.walk_forward_span}"
        )
    return None


def _train_candidate(
    args: argparse.Namespace,
    series: list[PriceSeries],
    model_config: ModelConfig,
    train_config: TrainConfig,
) -> tuple[FitOutcome, WalkForwardResult | None]:
    """The candidate model and its test figures: one split, or walk-forward folds."""
    folds = getattr(args, "walk_forward", None)
    if folds is None:
        outcome = fit_and_evaluate(
            series,
            model_config,
            train_config,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            split_by=args.split,
            skip_uncovered=bool(args.from_kafka),
            progress=not args.no_progress,
        )
        return outcome, None
    # The promotion gate then scores candidate and LATEST on the same windows: the last
    # fold's test block, which the candidate never trained on.
    walk = run_walk_forward(
        series,
        folds,
        model_config,
        train_config,
        eval_fraction=args.walk_forward_span,
        val_fraction=args.val_fraction,
        scheme=args.walk_forward_scheme,
        split_by=args.split,
        skip_uncovered=bool(args.from_kafka),
        progress=not args.no_progress,
    )
    final = walk.final
    outcome = FitOutcome.scored(final.split, final.training, final.test_predicted, final.evaluation)
    return outcome, walk


def _checkpoint_meta(
    outcome: FitOutcome,
    walk: WalkForwardResult | None,
    decision: PromotionDecision,
    parent: str | None,
    train_config: TrainConfig,
    split_by: SplitBy,
) -> CheckpointMeta:
    training = outcome.training
    return CheckpointMeta(
        version=new_version(),
        architecture=training.model.config,
        training_data=training_ranges(outcome.split),
        evaluation={
            "rmse_ratio": outcome.evaluation["rmse_ratio"],
            "test": outcome.evaluation,
            "test_data": [r.model_dump() for r in held_out_ranges(outcome.split)],
            "split_by": split_by,
            "windows": {
                "train": len(outcome.split.train),
                "val": len(outcome.split.val),
                "test": len(outcome.split.test),
            },
            "training": {
                "best_epoch": training.best_epoch,
                "epochs_run": len(training.history) - 1,
                "out_of_time": training.out_of_time,
                "best_val_loss": training.best_val_loss,
                "untrained_val_loss": training.history[0].val_loss,
                "seconds": round(training.seconds, 3),
                "device": training.device,
                "config": train_config.model_dump(),
            },
            "promotion": {
                "promoted": decision.promote,
                "reason": decision.reason,
                "incumbent_version": decision.incumbent_version,
                "incumbent_rmse": decision.incumbent_rmse,
                "candidate_rmse": decision.candidate_rmse,
                "compared_windows": decision.compared_windows,
            },
            "walk_forward": walk.summary if walk is not None else None,
        },
        parent_version=parent,
    )


def retrain_once(args: argparse.Namespace) -> int:
    """One retrain: load, train, evaluate, save, promote if not worse; the exit code."""
    started = time.perf_counter()
    checkpoint_dir = Path(
        args.checkpoint_dir or os.environ.get(CHECKPOINT_DIR_ENV) or DEFAULT_CHECKPOINT_DIR
    )
    problem = _usage_problem(args)
    if problem is not None:
        return _fail(problem)
    model_config, train_config = _configs(args)
    device = resolve_device(train_config.device)
    try:
        read_latest(checkpoint_dir)  # an unreadable LATEST fails now, not after training
    except (CheckpointError, OSError) as exc:
        return _fail(f"checkpoint in service: {exc}")
    try:
        series = (
            kafka_training_data(args, model_config.window_length)
            if args.from_kafka
            else load_training_data(args.data)
        )
        outcome, walk = _train_candidate(args, series, model_config, train_config)
    except DataError as exc:
        return _fail(str(exc))

    try:
        # Under the lock LATEST cannot change between reading it, deciding against it and
        # promoting: another run's promotion lands before or after all three.
        with promotion_lock(checkpoint_dir):
            parent = read_latest(checkpoint_dir)
            served_length = _window_length_of(checkpoint_dir, parent)
            decision = decide_promotion(
                checkpoint_dir,
                outcome.split,
                outcome.test_predicted,
                force=args.force,
                device=device,
            )
            meta = _checkpoint_meta(outcome, walk, decision, parent, train_config, args.split)
            version_dir = save_checkpoint(checkpoint_dir, outcome.training.model, meta)
            plot_path = _plot(version_dir / PLOT_FILE, outcome)
            if decision.promote:
                promote(checkpoint_dir, meta.version)
    except CheckpointError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"could not write the checkpoint: {exc}", EXIT_FAILURE)
    length_change = (
        [served_length, meta.window_length]
        if decision.promote and served_length not in (None, meta.window_length)
        else None
    )
    if decision.promote:
        logger.info("promoted %s to LATEST: %s", meta.version, decision.reason)
        if length_change:
            logger.warning(
                "%s uses %d-tick windows, %s in service used %d: running daemons refuse a "
                "checkpoint of another window length and keep serving %s until they are "
                "restarted (a restart rebuilds every window at the new length)",
                meta.version,
                meta.window_length,
                parent,
                served_length,
                parent,
            )
    else:
        logger.warning("kept %s out of service: %s", meta.version, decision.reason)

    report = {
        "version": meta.version,
        "checkpoint": str(version_dir),
        "plot": str(plot_path),
        "promoted": decision.promote,
        "reason": decision.reason,
        "parent_version": parent,
        "window_length_change": length_change,
        "incumbent_rmse": decision.incumbent_rmse,
        "candidate_rmse": decision.candidate_rmse,
        "compared_windows": decision.compared_windows,
        "series": [cut.series.symbol for cut in outcome.split.cuts],
        "split_by": args.split,
        "evaluation": outcome.evaluation,
        "windows": meta.evaluation["windows"],
        "training": meta.evaluation["training"],
        "walk_forward": meta.evaluation["walk_forward"],
        "seconds": round(time.perf_counter() - started, 3),
    }
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _window_length_of(checkpoint_dir: Path, version: str | None) -> int | None:
    """The window length ``version`` records; None without a version or a readable meta."""
    if version is None:
        return None
    try:
        return read_meta(checkpoint_dir / version).window_length
    except CheckpointError:
        return None


def _plot(path: Path, outcome: FitOutcome) -> Path:
    # One series only: a line through the end of one symbol and the start of the next
    # would be meaningless.
    first = outcome.split.test.series_index == 0
    symbol = outcome.split.cuts[0].series.symbol
    ratio = rmse_ratio(
        float(
            np.sqrt(
                np.mean((outcome.test_predicted[first] - outcome.split.test.targets[first]) ** 2)
            )
        ),
        float(
            np.sqrt(
                np.mean((outcome.split.test.last[first] - outcome.split.test.targets[first]) ** 2)
            )
        ),
    )
    return plot_predictions(
        path,
        outcome.split.test.targets[first],
        outcome.test_predicted[first],
        title=f"{symbol}: GRU next-price predictions vs actual (test RMSE / naive = {ratio:.4f})",
        ts=outcome.split.test.target_ts[first],
    )


def _fmt(value: float | None, digits: int = 6) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable report of one retrain."""
    evaluation = report["evaluation"]
    windows = report["windows"]
    training = report["training"]
    rows = [
        f"tickcast retrain: {report['version']} "
        f"({windows['train']} train / {windows['val']} val / {windows['test']} test windows; "
        f"{training['epochs_run']} epochs, best {training['best_epoch']}, on {training['device']}; "
        f"{report['seconds']:.1f} s)",
        f"held-out test, {evaluation['windows']} windows:",
        f"  {'':<22}{'RMSE':>12}{'MAE':>12}{'MAPE %':>10}{'direction':>11}",
    ]
    for name, label in (("gru", "GRU"), ("naive", "naive (next = last)")):
        figures = evaluation[name]
        direction = figures["directional_accuracy"]
        rows.append(
            f"  {label:<22}{_fmt(figures['rmse']):>12}{_fmt(figures['mae']):>12}"
            f"{figures['mape']:>10.4f}{'n/a' if direction is None else f'{direction:.3f}':>11}"
        )
    # With several series the table's RMSEs are pooled in price units, the ratio is not.
    scaled = " (errors scaled by each series' naive RMSE)" if len(report["series"]) > 1 else ""
    rows.append(f"  RMSE ratio GRU / naive{scaled}: {evaluation['rmse_ratio']:.4f}")
    walk = report.get("walk_forward")
    if walk:
        rows[1] = f"held-out test of the last walk-forward fold, {evaluation['windows']} windows:"
        rows.append(format_walk_forward(walk))
    status = "promoted to LATEST" if report["promoted"] else "NOT promoted"
    rows.append(f"{status}: {report['reason']}")
    if report.get("window_length_change"):
        served, new = report["window_length_change"]
        rows.append(
            f"window length {served} -> {new}: running daemons keep the old checkpoint "
            "until they are restarted"
        )
    rows.append(f"checkpoint: {report['checkpoint']}")
    rows.append(f"plot: {report['plot']}")
    return "\n".join(rows)
